"""The checkpoint folder: file names, the config written beside the tensors, and what the engine hands over.

A checkpoint is one folder with model.safetensors, adatsq_config.json, report.json, plan.json (adatsq
method only) and base/ (what rebuilds the rest of the model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from adatsq.errors import CheckpointError
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import WeightScheme

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "adatsq_config.json"
REPORT = "report.json"
PLAN = "plan.json"
BASE = "base"
CONFIG_KEYS = {
    "format_version", "adatsq_version", "method", "model", "activation", "num_steps", "timesteps",
    "segments", "segment_steps", "layers", "ignore", "recipe",
}  # fmt: skip
OPTIONAL_KEYS = {"checksums"}  # sha256 of every tensor's bytes (absent in checkpoints written before 0.x)
# what safetensors raises for a truncated or damaged file
SAFETENSORS_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, KeyError)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is stored: a weight scheme per timestep segment (one variant per distinct bits)."""

    bits: tuple[int, ...]  # weight bits at each segment
    group_size: int | None
    symmetric: bool

    def scheme(self, bits: int) -> WeightScheme:
        return WeightScheme(bits=bits, group_size=self.group_size, symmetric=self.symmetric)


def variant_prefix(name: str, bits: int) -> str:
    return f"{name}.w{bits}."


def layer_variants(module: nn.Module) -> dict[int, QuantLinear]:
    """bits -> QuantLinear of a quantized layer (one entry unless it switches with the timestep)."""
    if isinstance(module, TimestepQuantLinear):
        return {int(key[1:]): variant for key, variant in module.variants.items()}
    return {module.bits: module}


def read_config(directory: Path) -> dict[str, Any]:
    """adatsq_config.json of a checkpoint folder, with its version and keys checked."""
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(directory)!r} not found; create it with `adatsq quantize`"
        )
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not an adatsq checkpoint: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {detail}); re-run quantize") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(this adatsq reads {FORMAT_VERSION}); re-quantize with this version"
        )
    missing, unknown = CONFIG_KEYS - set(config), set(config) - CONFIG_KEYS - OPTIONAL_KEYS
    if missing or unknown:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return config
