"""Turn what a user passes (a name, a folder, a pipeline, an adapter) into a ModelAdapter.

Every family registers its adapter in `ADAPTERS` (checkpoints name their family) and answers
`open(model, dtype, device)`; resolution asks them in RESOLUTION_ORDER and never branches on names itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.base import ADAPTERS, ModelAdapter
from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.umm.adapter import UMMGenerationAdapter

# Who is asked first: the named models, then any existing folder or diffusers pipeline object.
RESOLUTION_ORDER: tuple[type[ModelAdapter], ...] = (
    ReferenceAdapter,
    UMMGenerationAdapter,
    DiffusersPipelineAdapter,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str | None) -> str | None:
    """A torch device this machine has ('cpu', 'cuda', 'cuda:1', ...); None keeps the default (cpu)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return name


def adapter_class(family: str) -> type[ModelAdapter]:
    """The registered adapter of a checkpoint's model family."""
    if family not in ADAPTERS.names():
        raise CheckpointError(
            f"unknown model family {family!r} in the checkpoint; supported: {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(family)


def adapter_for(model: Any, *, dtype: str | None = None, device: str | None = None) -> ModelAdapter:
    """`"reference"`, `"umm"`, a local diffusers folder, a DigitsPipeline / DiffusionPipeline, or an adapter.

    `dtype` / `device` place a model loaded from a name or folder (e.g. bfloat16 on cuda for Flux).
    """
    if isinstance(model, ModelAdapter):
        return model
    torch_dtype, device = parse_dtype(dtype), parse_device(device)
    for family in RESOLUTION_ORDER:
        adapter = family.open(model, torch_dtype, device)
        if adapter is not None:
            return adapter
    if isinstance(model, (str, Path)):
        raise ConfigError(
            f"model {str(model)!r} is neither 'reference', 'umm' nor an existing folder; "
            "pass 'reference', 'umm' or the path of a local diffusers pipeline folder"
        )
    raise ConfigError(
        f"cannot quantize a {type(model).__name__}; pass 'reference', a diffusers pipeline (object or local "
        "folder) or a ModelAdapter"
    )
