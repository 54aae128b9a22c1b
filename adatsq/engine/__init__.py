"""The orchestration: the only code that changes a model (calibrate → plan → solve → assemble)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.adaptive import quantize_adaptive, quantize_with_plan
from adatsq.engine.uniform import quantize as quantize_uniform
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
    and the others use the recipe's bits everywhere."""
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else load_plan(plan)
        return quantize_with_plan(model, recipe, plan, calibration, progress, resume)
    if QUANT_METHODS.get(recipe.method).plans:
        return quantize_adaptive(model, recipe, calibration, progress, resume)
    return quantize_uniform(model, recipe, calibration, progress=progress, resume=resume)
