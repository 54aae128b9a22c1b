"""Quantized checkpoints: one folder with model.safetensors, adatsq_config.json, report.json and base/.

Writes go to a temporary sibling folder renamed into place at the end, so a failure never leaves a
half-written checkpoint; loading validates the config against the tensors before touching the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from adatsq import __version__
from adatsq.engine import QuantizedModel, attach_segment_switching, effective_ignore, set_module
from adatsq.errors import CheckpointError, ConfigError
from adatsq.io import write_json
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_class
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import ActScheme
from adatsq.timesteps import SegmentMap

log = logging.getLogger(__name__)

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


def variant_prefix(name: str, bits: int) -> str:
    return f"{name}.w{bits}."


def _variants(module: nn.Module) -> dict[int, QuantLinear]:
    if isinstance(module, TimestepQuantLinear):
        return {int(key[1:]): variant for key, variant in module.variants.items()}
    return {module.bits: module}


def checkpoint_tensors(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every denoiser tensor: quantized layers as `<name>.w{bits}.<buffer>`, the rest as in state_dict."""
    denoiser = qmodel.adapter.denoiser()
    tensors: dict[str, torch.Tensor] = {}
    for name in qmodel.layers:
        for bits, variant in _variants(denoiser.get_submodule(name)).items():
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
        module = denoiser.get_submodule(name)
        variant = next(iter(_variants(module).values()))
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
        "ignore": list(effective_ignore(qmodel.adapter, qmodel.recipe)),
        "recipe": qmodel.recipe.to_dict(),
    }


def check_output(path: Path, overwrite: bool) -> None:
    """Existing outputs are never clobbered without `overwrite` (checked before any long work)."""
    if path.exists() and not overwrite:
        raise ConfigError(f"output {str(path)!r} already exists; pass --overwrite to replace it")


def prepare_output(directory: Path, overwrite: bool) -> Path:
    """Refuse to clobber without `overwrite`; return an empty temporary sibling folder to write into."""
    check_output(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".partial"))


def commit_output(tmp: Path, directory: Path) -> None:
    """Move a finished temporary folder into place, replacing an old one only after success."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def save_checkpoint(qmodel: QuantizedModel, directory: Path, overwrite: bool = False) -> Path:
    tmp = prepare_output(directory, overwrite)
    try:
        save_file(checkpoint_tensors(qmodel), str(tmp / WEIGHTS), metadata={"format": "pt", "adatsq": "1"})
        write_json(tmp / CONFIG, checkpoint_config(qmodel))
        qmodel.adapter.save_base(tmp / BASE)
        if qmodel.plan is not None:
            from adatsq.plan.schema import save_plan

            save_plan(qmodel.plan, tmp / PLAN)
        report = dict(qmodel.report)
        report["checkpoint_bytes"] = (tmp / WEIGHTS).stat().st_size
        write_json(tmp / REPORT, report)
        commit_output(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", directory)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(directory)!r} not found; create it with `adatsq quantize`"
        )
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not an adatsq checkpoint: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {err.msg}); re-run quantize") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(this adatsq reads {FORMAT_VERSION}); re-quantize with this version"
        )
    missing, unknown = CONFIG_KEYS - set(config), set(config) - CONFIG_KEYS
    if missing or unknown:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: re-run quantize")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted ({err}); re-run quantize") from None


def _split_variants(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """Group tensors by layer and bit-width, checking each layer has exactly the variants its row needs."""
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, layer in config["layers"].items():
        grouped[name] = {}
        for bits in sorted(set(layer["bits"])):
            prefix = variant_prefix(name, bits)
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if "qweight" not in state:
                raise CheckpointError(
                    f"config says layer {name!r} has a {bits}-bit variant but {prefix}qweight is missing; "
                    "the config does not match the tensors: re-run quantize"
                )
            grouped[name][bits] = state
    return grouped


def load_checkpoint(directory: str | Path) -> tuple[ModelAdapter, dict[str, Any]]:
    """Rebuild the quantized model of a checkpoint folder; returns its adapter and config."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    adapter = adapter_class(config["model"]["family"]).load_base(directory / BASE)
    denoiser = adapter.denoiser()
    act = ActScheme(bits=config["activation"]["bits"])
    grouped = _split_variants(config, tensors)
    used: set[str] = set()
    for name, layer in config["layers"].items():
        try:
            original = denoiser.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} of the config does not exist in the base model") from None
        variants = {}
        for bits, state in grouped[name].items():
            used.update(variant_prefix(name, bits) + key for key in state)
            try:
                state = dict(state)
                variants[bits] = QuantLinear(
                    state.pop("qweight"), state.pop("scales"), state.pop("zeros"), state.pop("bias", None),
                    bits, layer["group_size"], layer["in_features"], act, **state,
                )  # fmt: skip
            except (KeyError, ValueError, RuntimeError, TypeError) as err:
                raise CheckpointError(
                    f"tensors of layer {name!r} ({bits}-bit) do not match the config: {err}"
                ) from None
        if (variants[min(variants)].out_features, variants[min(variants)].in_features) != tuple(
            original.weight.shape
        ):
            raise CheckpointError(
                f"layer {name!r} has shape {tuple(original.weight.shape)} in the base model"
            )
        module = (
            variants[min(variants)]
            if len(variants) == 1
            else TimestepQuantLinear(variants.values(), layer["bits"])
        )
        set_module(denoiser, name, module)
    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = denoiser.load_state_dict(rest, strict=False)
    quantized_keys = tuple(f"{name}." for name in config["layers"])
    missing = [k for k in missing if not k.startswith(quantized_keys)]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match its config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    segments = SegmentMap(tuple(tuple(r) for r in config["segment_steps"]), tuple(config["timesteps"]))
    attach_segment_switching(adapter, segments)
    denoiser.eval()
    return adapter, config


def load(directory: str | Path, token_reduction: str | None = None, keep: float = 0.5) -> Any:
    """`adatsq.load(DIR)`: the quantized pipeline (or model) ready to sample with its normal call.

    `token_reduction` (e.g. "g2tr") with `keep` reduces the understanding tokens of a unified model.
    """
    adapter, _ = load_checkpoint(directory)
    if token_reduction is not None:
        return adapter.with_token_reduction(token_reduction, keep)
    return adapter.user_model()
