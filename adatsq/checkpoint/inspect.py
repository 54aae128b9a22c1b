"""Human-readable tables of checkpoints (per layer: bits per segment, group, scheme, bytes) and plans."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adatsq.checkpoint.format import config_variant_grid, is_checkpoint, variant_prefix
from adatsq.checkpoint.validate import open_checkpoint
from adatsq.core.tables import table
from adatsq.errors import CheckpointError
from adatsq.models.layers import sensitive_layers
from adatsq.models.resolve import adapter_for
from adatsq.plan.inspect import inspect_plan_file
from adatsq.quant.kernels import choose_kernel, onednn
from adatsq.quant.kernels.dispatch import INT8_ONEDNN


def layer_kernel(layer: dict[str, Any], act_bits: int | None) -> str:
    """The kernel a float32 CPU input runs (what QuantLinear.kernel_for("cpu", float32) says), one
    entry per variant of a timestep-adaptive layer; A4 layers are flagged as simulated."""
    bits = sorted(set(layer["bits"]))
    grids = {b: config_variant_grid(layer, b) for b in bits}
    kernels = [
        choose_kernel(
            b,
            grids[b][0],
            layer["in_features"],
            act_bits,
            "cpu",
            torch.float32,
            onednn_available=onednn.available(),
            integer_groups=grids[b][1],
        )
        for b in bits
    ]
    pairs = zip(bits, kernels, strict=True)
    text = kernels[0] if len(bits) == 1 else ", ".join(f"w{b}: {k}" for b, k in pairs)
    return f"{text} (A4 simulated)" if act_bits == 4 else text


def group_text(layer: dict[str, Any]) -> str:
    """The group column: its size ("channel" for one per row), "int" marking integer group scales (whose
    8-bit variants are per channel)."""
    if not layer.get("integer_group_scales"):
        return str(layer["group_size"] or "channel")
    integer = any(config_variant_grid(layer, b)[1] for b in layer["bits"])
    parts = [f"{layer['group_size']} int"] if integer else []
    if 8 in layer["bits"]:
        parts.append("w8 channel" if parts else "channel")
    return ", ".join(parts)


def inspect_checkpoint(directory: Path, verify: bool = True) -> str:
    """The per-layer table of a checkpoint, after the same validation as `load_checkpoint`."""
    opened = open_checkpoint(directory, verify)
    config, sizes = opened.config, opened.files.sizes()
    act = config["activation"]["bits"]
    rows, quantized_bytes = [], 0
    for name, layer in config["layers"].items():
        prefixes = (*(variant_prefix(name, b) for b in set(layer["bits"])), f"{name}.bias")
        nbytes = sum(size for key, size in sizes.items() if key.startswith(prefixes))
        quantized_bytes += nbytes
        scheme = f"{'sym' if layer['symmetric'] else 'asym'} W{'/'.join(map(str, layer['bits']))}" + (
            f" A{act}" if act else ""
        )
        rows.append([name, "/".join(map(str, layer["bits"])), group_text(layer), scheme,
                     layer_kernel(layer, act), str(nbytes)])  # fmt: skip
    total = sum(sizes.values())
    summary = (
        f"{config['method']} checkpoint of {config['model']['family']!r}: {len(rows)} quantized layers, "
        f"{len(config['segments'])} timestep segment(s) over {config['num_steps']} steps; "
        f"{quantized_bytes} bytes in quantized layers, {total - quantized_bytes} in the rest, {total} total"
    )
    if any(INT8_ONEDNN in row[4] for row in rows):
        summary += f"; its int8-onednn layers run oneDNN's {onednn.layout()}"
    header = ["layer", "bits/segment", "group", "scheme", "kernel (cpu, float32)", "bytes"]
    return table(header, rows) + "\n" + summary


def inspect_model(model: str | Path) -> str:
    """Every Linear layer of a float model: what recipes' targets / ignore / pin regexes match against."""
    adapter = adapter_for(model)
    denoiser = adapter.denoiser()
    ignored, sensitive = adapter.default_ignore(), sensitive_layers(denoiser)
    rows, total = [], 0
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear):
            params = module.in_features * module.out_features
            total += params
            note = "default ignore" if any(re.search(p, name) for p in ignored) else ""
            note = note or ("sensitive (adaLN)" if any(re.search(p, name) for p in sensitive) else "")
            rows.append([name, f"{module.out_features}x{module.in_features}", str(params), note])
    header = ["layer", "out x in", "params", "note"]
    return table(header, rows) + f"\n{len(rows)} Linear layers, {total} weights ({adapter.family})"


def inspect_path(path: Path, verify: bool = True) -> str:
    """A checkpoint folder, a plan / frontier JSON, or a float model ('reference' or a diffusers folder)."""
    if (
        path.is_dir()
        and not is_checkpoint(path)
        and ((path / "model_index.json").exists() or (path / "config.json").exists())
    ):
        return inspect_model(path)
    if str(path) == "reference":
        return inspect_model("reference")
    if path.is_dir():
        return inspect_checkpoint(path, verify)
    if path.suffix == ".json" and path.is_file():
        return inspect_plan_file(path)
    raise CheckpointError(
        f"{str(path)!r} is neither a checkpoint folder, a plan/frontier .json file, 'reference' "
        "nor a diffusers folder"
    )
