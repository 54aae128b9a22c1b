"""Quantization methods a recipe can name, registered like adapters and reducers (decorator + dict).

A method is described by what it asks of the engine, so the engine branches on properties, never on names.
"""

from __future__ import annotations

from dataclasses import dataclass

from adatsq.core.registry import Registry


@dataclass(frozen=True)
class QuantMethod:
    name: str
    uses_hessian: bool  # GPTQ on the calibrated XᵀX; False = round-to-nearest
    plans: bool  # bit-widths per layer × timestep segment come from the AdaTSQ planner


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method")

for _method in (
    QuantMethod("rtn", uses_hessian=False, plans=False),
    QuantMethod("gptq", uses_hessian=True, plans=False),
    QuantMethod("adatsq", uses_hessian=True, plans=True),
):
    QUANT_METHODS.register(_method.name)(_method)
