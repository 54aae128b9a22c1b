"""Rebuild a quantized model from a checkpoint folder, validated first (validate.py).

Tensors are read one layer at a time from the (possibly sharded) files, and each float layer of the
base model is replaced as soon as its quantized variants exist, so loading holds the quantized model
plus one layer, never a second copy of the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adatsq.calibrate.segments import SegmentMap, attach_segment_switching
from adatsq.checkpoint.format import config_variant_grid
from adatsq.checkpoint.shards import TensorFiles
from adatsq.checkpoint.validate import open_checkpoint
from adatsq.core.modules import set_module
from adatsq.errors import CheckpointError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import parse_dtype
from adatsq.quant.kernels import KernelPolicy
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear, prepare_kernels, set_kernel_policy
from adatsq.quant.scheme import ActScheme


def quantized_layer(
    name: str, layer: dict[str, Any], keys: dict[int, list[str]], files: TensorFiles, act: ActScheme
) -> nn.Module:
    variants = {}
    for bits in sorted(set(layer["bits"])):
        state = {key.rsplit(".", 1)[1]: files.get(key) for key in keys[bits]}
        group, _ = config_variant_grid(layer, bits)
        try:
            variants[bits] = QuantLinear(
                state.pop("qweight"), state.pop("scales"), state.pop("zeros"), state.pop("bias", None),
                bits, group, layer["in_features"], act, **state,
            )  # fmt: skip
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(
                f"tensors of layer {name!r} ({bits}-bit) do not match the config: {err}"
            ) from None
    unused = sorted(set(keys) - set(variants))
    if unused:
        raise CheckpointError(
            f"layer {name!r} stores {unused}-bit variants its config never uses; re-run quantize"
        )
    first = variants[min(variants)]
    return first if len(variants) == 1 else TimestepQuantLinear(variants.values(), layer["bits"])


def fill_quantized_layers(
    denoiser: nn.Module,
    config: dict[str, Any],
    variant_keys: dict[str, dict[int, list[str]]],
    files: TensorFiles,
) -> None:
    """Replace every layer the config lists by its quantized variants, read one layer at a time."""
    act = ActScheme(bits=config["activation"]["bits"])
    for name, layer in config["layers"].items():
        module = quantized_layer(name, layer, variant_keys[name], files, act)
        set_module(denoiser, name, module)  # the float layer (or its placeholder) is released here


def segment_map(config: dict[str, Any]) -> SegmentMap:
    return SegmentMap(tuple(tuple(r) for r in config["segment_steps"]), tuple(config["timesteps"]))


def load_checkpoint(directory: str | Path, verify: bool = True) -> tuple[ModelAdapter, dict[str, Any]]:
    """Rebuild the quantized model of a checkpoint folder; returns its adapter and config.

    The folder is validated first (`open_checkpoint`: config schema, every tensor's dtype and shape,
    the base model); `verify` also checks every tensor's sha256 recorded in the config and each shard
    of a sharded checkpoint against its index.
    """
    opened = open_checkpoint(directory, verify)
    config, files, adapter = opened.config, opened.files, opened.adapter
    denoiser = adapter.denoiser()
    fill_quantized_layers(denoiser, config, opened.variant_keys, files)
    missing, unexpected = denoiser.load_state_dict({k: files.get(k) for k in opened.rest_keys}, strict=False)
    quantized_keys = tuple(f"{name}." for name in config["layers"])
    missing = [k for k in missing if not k.startswith(quantized_keys)]
    if missing or unexpected:  # open_checkpoint checked the keys: only a changed model class gets here
        raise CheckpointError(
            f"the tensors in {directory} do not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    attach_segment_switching(adapter, segment_map(config))
    denoiser.eval()
    return adapter, config


def cast_for_inference(
    adapter: ModelAdapter, dtype: torch.dtype | str | None, kernel_policy: KernelPolicy | None = None
) -> dict[str, str]:
    """Cast the denoiser and the pipeline's other components to `dtype` (a torch dtype or its name;
    None: leave them), give every quantized layer `kernel_policy` (None: keep theirs) and derive its
    kernel layout for inputs of that dtype now (float32 when None); returns layer -> kernel.

    Quantized layers keep their float16 scales (the grid stays exact); bias and transforms follow dtype.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    user = adapter.user_model()
    denoiser = adapter.denoiser()
    if dtype is not None:
        if user is not denoiser and callable(getattr(user, "to", None)):
            user.to(dtype)  # a pipeline: every component (text encoders, VAE), the denoiser included
        denoiser.to(dtype)
    if kernel_policy is not None:
        set_kernel_policy(denoiser, kernel_policy)
    return prepare_kernels(denoiser, dtype or torch.float32)
