"""Rebuild a quantized model from a checkpoint folder, validating the config against the tensors first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from adatsq.calibrate.segments import SegmentMap, attach_segment_switching
from adatsq.checkpoint.format import BASE, SAFETENSORS_ERRORS, WEIGHTS, read_config, variant_prefix
from adatsq.core.modules import set_module
from adatsq.errors import CheckpointError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_class
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import ActScheme


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: re-run quantize")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SAFETENSORS_ERRORS as err:
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
