"""adatsq: timestep-adaptive quantization for diffusion transformers, token reduction for UMMs.

import adatsq
qmodel = adatsq.quantize("reference", "recipes/reference/gptq-w4a8.yaml")
qmodel.save("out/w4a8")
pipe = adatsq.load("out/w4a8")          # the diffusers-style pipeline, quantized
images = pipe(class_labels=[3, 7]).images
"""

from __future__ import annotations

from typing import Any

from adatsq.errors import AdatsqError
from adatsq.recipe import Recipe, load_recipe

__version__ = "0.1.0"


def quantize(
    model: Any,
    recipe: Recipe | str,
    calibration: Any = None,
    *,
    plan: Any = None,
    progress: bool = True,
    resume: Any = None,
) -> Any:
    """Quantize a model / pipeline / 'reference' with a recipe; returns a QuantizedModel (`.model`, `.save`).

    `plan` (a Plan or a plan.json path) fixes the bits per layer × timestep segment; without it the
    'adatsq' method plans under the recipe's budget and 'rtn' / 'gptq' use the recipe's bits everywhere.
    `resume` (a file path) saves calibration progress there and continues from it after an interruption.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if plan is not None:
        from adatsq.plan.schema import Plan, load_plan
        from adatsq.planning import quantize_with_plan

        plan = plan if isinstance(plan, Plan) else load_plan(plan)
        return quantize_with_plan(model, recipe, plan, calibration, progress, resume)
    if recipe.method == "adatsq":
        from adatsq.planning import quantize_adaptive

        return quantize_adaptive(model, recipe, calibration, progress, resume)
    from adatsq.engine import quantize as quantize_uniform

    return quantize_uniform(model, recipe, calibration, progress=progress, resume=resume)


def load(directory: Any, **options: Any) -> Any:
    """Load a checkpoint folder written by `adatsq quantize`: the pipeline (or model), ready to sample."""
    from adatsq.checkpoint import load as run

    return run(directory, **options)


__all__ = ["AdatsqError", "Recipe", "__version__", "load", "load_recipe", "quantize"]
