"""The orchestration: the only code that changes a model (calibrate → plan → solve → assemble)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.adaptive import quantize_adaptive, quantize_with_plan
from adatsq.engine.uniform import quantize as quantize_uniform
from adatsq.models.resolve import adapter_for
from adatsq.plan.schema import Plan, load_plan
from adatsq.quant.methods import QUANT_METHODS
from adatsq.recipe import Recipe


def quantize(
    model: Any,
    recipe: Recipe,
    calibration: Sequence[Any] | None = None,
    *,
    plan: Plan | str | Path | None = None,
    progress: bool = True,
    resume: Path | None = None,
) -> QuantizedModel:
    """A plan fixes the bits per layer × segment; else a planning method plans under the recipe's budget
    and the others use the recipe's bits everywhere. The run samples inside `repeated_sampling`."""
    plan = plan if plan is None or isinstance(plan, Plan) else load_plan(plan)
    adapter = adapter_for(model)  # resolved once: the flows below reuse it
    with adapter.repeated_sampling():
        if plan is not None:
            return quantize_with_plan(adapter, recipe, plan, calibration, progress, resume)
        if QUANT_METHODS.get(recipe.method).plans:
            return quantize_adaptive(adapter, recipe, calibration, progress, resume)
        return quantize_uniform(adapter, recipe, calibration, progress=progress, resume=resume)
