"""Numeric core: schemes, RTN, GPTQ, bit packing, runtime layers and outlier transforms."""

from adatsq.quant.gptq import GPTQResult, gptq
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.pack import pack, unpack
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import (
    ACT_BITS,
    WEIGHT_BITS,
    ActScheme,
    QuantizedWeight,
    WeightScheme,
    fake_quant_activation,
    quant_error,
)
from adatsq.quant.transforms import InputTransform, TransformScheme, build_transform, transform_hessian

__all__ = [
    "ACT_BITS",
    "WEIGHT_BITS",
    "ActScheme",
    "GPTQResult",
    "InputTransform",
    "QuantLinear",
    "QuantizedWeight",
    "TimestepQuantLinear",
    "TransformScheme",
    "WeightScheme",
    "build_transform",
    "fake_quant_activation",
    "gptq",
    "pack",
    "quant_error",
    "rtn",
    "transform_hessian",
    "unpack",
]
