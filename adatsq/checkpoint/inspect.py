"""Human-readable tables of checkpoints (per layer: bits per segment, group, scheme, bytes) and plans."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open
from torch import nn

from adatsq.checkpoint.format import CONFIG, SAFETENSORS_ERRORS, WEIGHTS, read_config, variant_prefix
from adatsq.core.tables import table
from adatsq.errors import CheckpointError
from adatsq.models.layers import sensitive_layers
from adatsq.models.resolve import adapter_for
from adatsq.plan.inspect import inspect_plan_file

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F32": 4,
    "I32": 4,
    "F64": 8,
    "I64": 8,
}


def tensor_bytes(path: Path) -> dict[str, int]:
    """Stored bytes of every tensor, read from the safetensors header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            sizes = {}
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                view = f.get_slice(key)
                count = 1
                for dim in view.get_shape():
                    count *= dim
                sizes[key] = count * DTYPE_BYTES[view.get_dtype()]
            return sizes
    except SAFETENSORS_ERRORS as err:
        raise CheckpointError(f"{path} is truncated or corrupted ({err}); re-run quantize") from None


def inspect_checkpoint(directory: Path) -> str:
    config = read_config(directory)
    sizes = tensor_bytes(directory / WEIGHTS)
    act = config["activation"]["bits"]
    rows, quantized_bytes = [], 0
    for name, layer in config["layers"].items():
        prefixes = (*(variant_prefix(name, b) for b in set(layer["bits"])), f"{name}.bias")
        nbytes = sum(size for key, size in sizes.items() if key.startswith(prefixes))
        quantized_bytes += nbytes
        scheme = f"{'sym' if layer['symmetric'] else 'asym'} W{'/'.join(map(str, layer['bits']))}" + (
            f" A{act}" if act else ""
        )
        rows.append([name, "/".join(map(str, layer["bits"])), str(layer["group_size"] or "channel"), scheme,
                     str(nbytes)])  # fmt: skip
    total = sum(sizes.values())
    summary = (
        f"{config['method']} checkpoint of {config['model']['family']!r}: {len(rows)} quantized layers, "
        f"{len(config['segments'])} timestep segment(s) over {config['num_steps']} steps; "
        f"{quantized_bytes} bytes in quantized layers, {total - quantized_bytes} in the rest, {total} total"
    )
    return table(["layer", "bits/segment", "group", "scheme", "bytes"], rows) + "\n" + summary


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


def inspect_path(path: Path) -> str:
    """A checkpoint folder, a plan / frontier JSON, or a float model ('reference' or a diffusers folder)."""
    if (
        path.is_dir()
        and not (path / CONFIG).exists()
        and ((path / "model_index.json").exists() or (path / "config.json").exists())
    ):
        return inspect_model(path)
    if str(path) == "reference":
        return inspect_model("reference")
    if path.is_dir():
        return inspect_checkpoint(path)
    if path.suffix == ".json" and path.is_file():
        return inspect_plan_file(path)
    raise CheckpointError(
        f"{str(path)!r} is neither a checkpoint folder, a plan/frontier .json file, 'reference' "
        "nor a diffusers folder"
    )
