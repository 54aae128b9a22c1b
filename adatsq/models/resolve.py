"""Turn what a user passes (a name, a folder, a pipeline, an adapter) into a ModelAdapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adatsq.errors import ConfigError
from adatsq.models.base import ModelAdapter

REFERENCE = "reference"


def adapter_for(model: Any) -> ModelAdapter:
    """`"reference"`, a local diffusers folder, a DigitsPipeline / DiffusionPipeline, or an adapter."""
    if isinstance(model, ModelAdapter):
        return model
    from adatsq.models.reference import DigitsPipeline
    from adatsq.models.reference_adapter import ReferenceAdapter

    if isinstance(model, DigitsPipeline):
        return ReferenceAdapter(model)
    if isinstance(model, (str, Path)):
        if str(model) == REFERENCE:
            adapter: ModelAdapter = ReferenceAdapter()
        else:
            path = Path(model)
            if not path.exists():
                raise ConfigError(
                    f"model {str(model)!r} is neither {REFERENCE!r} nor an existing folder; "
                    "pass 'reference' or the path of a local diffusers pipeline folder"
                )
            from adatsq.models.diffusers_dit import DiffusersPipelineAdapter

            adapter = DiffusersPipelineAdapter.from_folder(path)
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
