"""Fast forward paths for QuantLinear, chosen per layer from its scheme and the input's device/dtype.

dispatch: the pure choice (`choose_kernel`, `KERNELS`, `KernelPolicy`); intmm: `torch._int_mm` with
device padding rules; layouts: what each kernel derives from the checkpoint buffers (never saved);
forward: the kernels themselves. The reference path lives in `QuantLinear.reference_forward`.
"""

from adatsq.quant.kernels.dispatch import KERNELS, KernelPolicy, choose_kernel, per_channel
from adatsq.quant.kernels.intmm import IntMMRules, int8_matmul, int_mm_rules

__all__ = [
    "KERNELS",
    "IntMMRules",
    "KernelPolicy",
    "choose_kernel",
    "int8_matmul",
    "int_mm_rules",
    "per_channel",
]
