"""adatsq: timestep-adaptive quantization for diffusion transformers, token reduction for UMMs.

import adatsq
qmodel = adatsq.quantize("reference", "recipes/reference/gptq-w4a8.yaml")
qmodel.save("out/w4a8")
pipe = adatsq.load("out/w4a8")          # the diffusers-style pipeline, quantized
images = pipe(class_labels=[3, 7]).images
"""

from __future__ import annotations

from typing import Any

from adatsq.core.version import __version__
from adatsq.errors import AdatsqError
from adatsq.recipe import Recipe, load_recipe


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
    `progress=False` (or TQDM_DISABLE set) draws no progress bar; bars are hidden off a terminal anyway.
    """
    from adatsq.core.progress import bars_wanted
    from adatsq.engine import quantize as run

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return run(model, recipe, calibration, plan=plan, progress=bars_wanted(progress), resume=resume)


def load(
    directory: Any,
    token_reduction: str | None = None,
    keep: float = 0.5,
    *,
    dtype: Any = None,
    verify: bool = True,
    kernel_policy: Any = None,
) -> Any:
    """Load a checkpoint folder written by `adatsq quantize`: the pipeline (or model), ready to sample.

    `dtype` (torch.bfloat16, or "bfloat16") casts the denoiser and the pipeline's components to it;
    every quantized layer's kernel layout is derived for inputs of that dtype (float32 when None) at
    load, so the first sampling step does not pay for it. `verify=False` skips the sha256 of every
    tensor (the folder's structure is validated either way). `kernel_policy` (an
    `adatsq.quant.kernels.KernelPolicy`, e.g. `KernelPolicy(compiled=True)`) replaces every quantized
    layer's default kernel choices before the layouts are derived. A unified model comes back as a
    `UnifiedModel` (understanding + generation); `token_reduction` (e.g. "g2tr") with `keep` reduces
    its understanding tokens.
    """
    from adatsq.checkpoint.load import cast_for_inference, load_checkpoint
    from adatsq.models.umm.adapter import UMMGenerationAdapter

    adapter, _ = load_checkpoint(directory, verify)
    cast_for_inference(adapter, dtype, kernel_policy)
    if token_reduction is None and not isinstance(adapter, UMMGenerationAdapter):
        return adapter.user_model()
    from adatsq.tokens.umm.unified import with_token_reduction

    return with_token_reduction(adapter, token_reduction, keep)


def register_with_diffusers() -> None:
    """Let `DiffusionPipeline.from_pretrained` / `<Model>.from_pretrained` load adatsq checkpoints (the
    quantized denoiser, timestep switching attached). Idempotent; refused on an untested diffusers."""
    from adatsq.checkpoint.hf import register_with_diffusers as register

    register()


def register_with_transformers() -> None:
    """Let transformers' `AutoModel.from_pretrained` load adatsq components. Idempotent; refused on an
    untested transformers."""
    from adatsq.checkpoint.hf import register_with_transformers as register

    register()


__all__ = [
    "AdatsqError",
    "Recipe",
    "__version__",
    "load",
    "load_recipe",
    "quantize",
    "register_with_diffusers",
    "register_with_transformers",
]
