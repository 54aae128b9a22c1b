"""Turn what a user passes (a name, a folder, a pipeline, an adapter) into a ModelAdapter."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.base import ADAPTERS, ModelAdapter

REFERENCE = "reference"
UMM = "umm"  # the shipped reference unified model (its generation path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# Where each family's adapter lives: imported on demand, so `import adatsq` stays light.
FAMILY_MODULES = {
    "reference": "adatsq.models.reference_adapter",
    "diffusers": "adatsq.models.diffusers_dit",
    "umm": "adatsq.tokens.umm.generation",
}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The registered adapter of a checkpoint's model family (its module imported first)."""
    if family not in FAMILY_MODULES:
        raise CheckpointError(
            f"unknown model family {family!r} in the checkpoint; supported: {', '.join(FAMILY_MODULES)}"
        )
    importlib.import_module(FAMILY_MODULES[family])
    return ADAPTERS.get(family)


def adapter_for(model: Any, *, dtype: str | None = None, device: str | None = None) -> ModelAdapter:
    """`"reference"`, `"umm"`, a local diffusers folder, a DigitsPipeline / DiffusionPipeline, or an adapter.

    `dtype` / `device` place a model loaded from a name or folder (e.g. bfloat16 on cuda for Flux).
    """
    torch_dtype = parse_dtype(dtype)
    if isinstance(model, ModelAdapter):
        return model
    from adatsq.models.reference import DigitsPipeline
    from adatsq.models.reference_adapter import ReferenceAdapter

    if isinstance(model, DigitsPipeline):
        return ReferenceAdapter(model)
    if isinstance(model, (str, Path)):
        if str(model) == UMM:
            from adatsq.tokens.umm.generation import UMMGenerationAdapter

            adapter: ModelAdapter = UMMGenerationAdapter()
        elif str(model) == REFERENCE:
            from adatsq.models.reference import reference_pipeline

            adapter = ReferenceAdapter(reference_pipeline().to(device=device, dtype=torch_dtype))
        else:
            path = Path(model)
            if not path.exists():
                raise ConfigError(
                    f"model {str(model)!r} is neither {REFERENCE!r}, {UMM!r} nor an existing folder; "
                    "pass 'reference', 'umm' or the path of a local diffusers pipeline folder"
                )
            from adatsq.models.diffusers_dit import DiffusersPipelineAdapter

            adapter = DiffusersPipelineAdapter.from_folder(path, dtype=torch_dtype, device=device)
            model = path.resolve()
        adapter.source = str(model)
        return adapter
    from diffusers import DiffusionPipeline

    if isinstance(model, DiffusionPipeline):
        from adatsq.models.diffusers_dit import DiffusersPipelineAdapter

        return DiffusersPipelineAdapter(model)
    raise ConfigError(
        f"cannot quantize a {type(model).__name__}; pass 'reference', a diffusers pipeline (object or local "
        "folder) or a ModelAdapter"
    )
