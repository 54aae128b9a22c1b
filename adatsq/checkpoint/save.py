"""The engine's result (`QuantizedModel`) and how it is written as a checkpoint folder (atomically)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from adatsq.calibrate.segments import SegmentMap
from adatsq.checkpoint.format import (
    FORMAT_VERSION,
    MODEL_CONFIG,
    PLAN,
    QUANT_METHOD,
    QUANTIZATION_CONFIG,
    REPORT,
    LayerSpec,
    is_checkpoint,
    layer_variants,
    read_json_object,
    variant_prefix,
)
from adatsq.checkpoint.shards import DEFAULT_MAX_SHARD, tensor_sha256, write_tensors
from adatsq.core.io import check_output, output_folder, write_json
from adatsq.core.sizes import parse_size
from adatsq.core.version import __version__
from adatsq.errors import ConfigError
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
        self,
        directory: str | Path,
        overwrite: bool = False,
        max_shard_size: str = DEFAULT_MAX_SHARD,
        link_components: bool = False,
    ) -> Path:
        """`link_components`: hard-link the pipeline's other components from the folder it was loaded
        from (same filesystem; else symlinks) instead of writing them again."""
        return save_checkpoint(self, Path(directory), overwrite, max_shard_size, link_components)


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
        if spec.integer_group_scales:  # written only when set: older readers and configs stay as they were
            layers[name]["integer_group_scales"] = True
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


def check_destination(directory: Path, overwrite: bool = False) -> None:
    """Refuse a checkpoint destination that cannot or may not be written (before any long work)."""
    check_output(directory, overwrite, folder=True, owned=is_checkpoint)


def write_component_config(folder: Path, denoiser: Any, config: dict[str, Any]) -> None:
    """The denoiser's config.json with the adatsq config as its quantization_config.

    The model's own config is the one its base wrote there (diffusers' save_config), or written now from
    the model (`save_config`), or empty for a model without one (the reference UMM's flow denoiser).
    """
    path = folder / MODEL_CONFIG
    if not path.is_file() and callable(getattr(denoiser, "save_config", None)):
        denoiser.save_config(folder)
    model_config = read_json_object(path) if path.is_file() else {}
    model_config[QUANTIZATION_CONFIG] = {"quant_method": QUANT_METHOD, **config}
    write_json(path, model_config)


def weights_stem(denoiser: nn.Module) -> str:
    """How the component's tensor files are named: as its library's from_pretrained looks for them."""
    return "diffusion_pytorch_model" if isinstance(denoiser, diffusers.ModelMixin) else "model"


def save_checkpoint(
    qmodel: QuantizedModel,
    directory: Path,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD,
    link_components: bool = False,
) -> Path:
    """Write the checkpoint folder (format 2, see format.py); tensors over `max_shard_size` in total are
    split into shards."""
    shard_bytes = parse_size(max_shard_size)
    if link_components:
        qmodel.adapter.check_linkable()  # before the destination is touched
    with output_folder(directory, overwrite, owned=is_checkpoint) as tmp:
        # a normal folder of the family, without the denoiser's weights
        qmodel.adapter.save_base(tmp, link_components=link_components)
        component = tmp / qmodel.adapter.denoiser_folder
        component.mkdir(parents=True, exist_ok=True)
        tensors = checkpoint_tensors(qmodel)
        written = write_tensors(component, tensors, shard_bytes, weights_stem(qmodel.adapter.denoiser()))
        config = checkpoint_config(qmodel)
        config["checksums"] = {key: tensor_sha256(tensors[key]) for key in sorted(tensors)}
        write_component_config(component, qmodel.adapter.denoiser(), config)
        if qmodel.plan is not None:
            save_plan(qmodel.plan, tmp / PLAN)
        report = dict(qmodel.report)
        report["checkpoint_bytes"] = written
        write_json(tmp / REPORT, report)
    log.info("wrote %s", directory)
    return directory


def save_component(
    qmodel: QuantizedModel,
    prefix: str,
    directory: Path,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD,
) -> Path:
    """Write the submodule `prefix` of the denoiser (a transformers or diffusers model holding quantized
    layers, e.g. the reference UMM's language model "model.lm") as a component folder of its own:
    its config.json with quantization_config + safetensors, keys and layer names relative to it."""
    module = qmodel.adapter.denoiser().get_submodule(prefix)
    if not callable(getattr(module, "save_pretrained", None)):
        raise ConfigError(
            f"{prefix!r} is a {type(module).__name__}, not a transformers / diffusers model; "
            "pass the name of one (e.g. 'model.lm' of the reference UMM)"
        )
    start = f"{prefix}."
    layers = {name[len(start) :]: spec for name, spec in qmodel.layers.items() if name.startswith(start)}
    if not layers:
        raise ConfigError(f"{prefix!r} holds no quantized layer; some that are: {sorted(qmodel.layers)[:3]}")
    tensors = {k[len(start) :]: v for k, v in checkpoint_tensors(qmodel).items() if k.startswith(start)}
    config = checkpoint_config(qmodel)
    rows = config["layers"]
    config["layers"] = {name[len(start) :]: rows[name] for name in rows if name.startswith(start)}
    config["checksums"] = {key: tensor_sha256(tensors[key]) for key in sorted(tensors)}
    with output_folder(directory, overwrite, owned=is_checkpoint) as tmp:
        write_tensors(tmp, tensors, parse_size(max_shard_size), weights_stem(module))
        if hasattr(module, "config") and callable(getattr(module.config, "save_pretrained", None)):
            module.config.save_pretrained(tmp)  # transformers: config.json
        write_component_config(tmp, module, config)
    return directory
