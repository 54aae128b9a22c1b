"""The engine's result (`QuantizedModel`) and how it is written as a checkpoint folder (atomically)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adatsq.calibrate.segments import SegmentMap
from adatsq.checkpoint.format import (
    BASE,
    CONFIG,
    FORMAT_VERSION,
    PLAN,
    REPORT,
    LayerSpec,
    layer_variants,
    variant_prefix,
)
from adatsq.checkpoint.shards import DEFAULT_MAX_SHARD, tensor_sha256, write_tensors
from adatsq.core.io import check_output, output_folder, write_json
from adatsq.core.sizes import parse_size
from adatsq.core.version import __version__
from adatsq.models.base import ModelAdapter
from adatsq.plan.schema import save_plan
from adatsq.quant.scheme import ActScheme
from adatsq.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A model whose selected Linear layers were replaced; `save` writes the checkpoint."""

    adapter: ModelAdapter
    recipe: Recipe
    segments: SegmentMap
    layers: dict[str, LayerSpec]
    activation: ActScheme
    ignore: tuple[str, ...]  # the ignore patterns in force (the recipe's or the family's defaults)
    report: dict[str, Any] = field(default_factory=dict)
    plan: Any = None  # the adatsq.plan Plan it was quantized with, written beside the checkpoint

    @property
    def model(self) -> Any:
        return self.adapter.user_model()

    def save(
        self, directory: str | Path, overwrite: bool = False, max_shard_size: str = DEFAULT_MAX_SHARD
    ) -> Path:
        return save_checkpoint(self, Path(directory), overwrite, max_shard_size)


def checkpoint_tensors(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every denoiser tensor: quantized layers as `<name>.w{bits}.<buffer>`, the rest as in state_dict."""
    denoiser = qmodel.adapter.denoiser()
    tensors: dict[str, torch.Tensor] = {}
    for name in qmodel.layers:
        for bits, variant in layer_variants(denoiser.get_submodule(name)).items():
            for key, value in variant.state_dict().items():
                tensors[variant_prefix(name, bits) + key] = value
    prefixes = tuple(f"{name}." for name in qmodel.layers)
    for key, value in denoiser.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value
    # safetensors refuses shared storage: tied or expanded tensors are stored as independent copies
    return {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}


def checkpoint_config(qmodel: QuantizedModel) -> dict[str, Any]:
    denoiser = qmodel.adapter.denoiser()
    layers = {}
    for name, spec in qmodel.layers.items():
        variant = next(iter(layer_variants(denoiser.get_submodule(name)).values()))
        layers[name] = {
            "bits": list(spec.bits),
            "group_size": spec.group_size,
            "symmetric": spec.symmetric,
            "in_features": variant.in_features,
            "out_features": variant.out_features,
        }
    return {
        "format_version": FORMAT_VERSION,
        "adatsq_version": __version__,
        "method": qmodel.recipe.method,
        "model": {"family": qmodel.adapter.family, "source": qmodel.adapter.source},
        "activation": {"bits": qmodel.activation.bits},
        "num_steps": len(qmodel.segments.timesteps),
        "timesteps": list(qmodel.segments.timesteps),
        "segments": [list(pair) for pair in qmodel.segments.intervals()],
        "segment_steps": [list(pair) for pair in qmodel.segments.step_ranges],
        "layers": layers,
        "ignore": list(qmodel.ignore),
        "recipe": _stored_recipe(qmodel.recipe),
    }


def _stored_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe without its memory budget: the budget never changes the result, so it is not stored."""
    data = recipe.to_dict()
    del data["calibration"]["max_memory"]
    return data


def is_checkpoint(directory: Path) -> bool:
    """A folder this program wrote (the only kind of folder --overwrite replaces)."""
    return (directory / CONFIG).is_file()


def check_destination(directory: Path, overwrite: bool = False) -> None:
    """Refuse a checkpoint destination that cannot or may not be written (before any long work)."""
    check_output(directory, overwrite, folder=True, owned=is_checkpoint)


def save_checkpoint(
    qmodel: QuantizedModel, directory: Path, overwrite: bool = False, max_shard_size: str = DEFAULT_MAX_SHARD
) -> Path:
    """Write the checkpoint folder; tensors over `max_shard_size` in total are split into shards."""
    shard_bytes = parse_size(max_shard_size)
    with output_folder(directory, overwrite, owned=is_checkpoint) as tmp:
        tensors = checkpoint_tensors(qmodel)
        written = write_tensors(tmp, tensors, shard_bytes)
        config = checkpoint_config(qmodel)
        config["checksums"] = {key: tensor_sha256(tensors[key]) for key in sorted(tensors)}
        write_json(tmp / CONFIG, config)
        qmodel.adapter.save_base(tmp / BASE)
        if qmodel.plan is not None:
            save_plan(qmodel.plan, tmp / PLAN)
        report = dict(qmodel.report)
        report["checkpoint_bytes"] = written
        write_json(tmp / REPORT, report)
    log.info("wrote %s", directory)
    return directory
