"""Everything a checkpoint folder must satisfy before any tensor is used; `load` and `inspect` share it.

`open_checkpoint` checks, in order: the config's schema (types, ranges, the schedule's consistency),
every tensor's dtype and shape against the config (safetensors headers only, no data read), the base
model it rebuilds from the folder (layer shapes, the float tensors' keys / dtypes / shapes) and, with
`verify`, the sha256 of every tensor's bytes recorded in the config. Each failure is one line naming
the file, the field or tensor, the bad value, what is allowed and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adatsq.checkpoint.format import Layout, config_variant_grid, read_checkpoint_config
from adatsq.checkpoint.shards import TORCH_DTYPES, TensorFiles
from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_class
from adatsq.quant.pack import packed_cols
from adatsq.quant.scheme import ACT_BITS, WEIGHT_BITS, n_groups

_VARIANT_KEY = re.compile(r"(?P<layer>.+)\.w(?P<bits>\d+)\.(?P<buffer>[a-z_]+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
LAYER_KEYS = {"bits", "group_size", "symmetric", "in_features", "out_features"}
OPTIONAL_LAYER_KEYS = {"integer_group_scales"}  # absent = false
FLOATS = ("F16", "BF16", "F32", "F64")
BUFFERS = {
    "qweight", "scales", "zeros", "channel_scales", "bias", "smooth", "rotation_signs", "lowrank_a",
    "lowrank_b",
}  # fmt: skip
FIX = "re-run quantize (the checkpoint was edited, damaged or written by another tool)"

Specs = dict[str, tuple[str, tuple[int, ...]]]  # tensor key -> (safetensors dtype, shape)


@dataclass
class OpenedCheckpoint:
    """A validated checkpoint: its config, its tensor files and the rebuilt base model (denoiser unloaded)."""

    config: dict[str, Any]
    layout: Layout
    files: TensorFiles
    adapter: ModelAdapter
    variant_keys: dict[str, dict[int, list[str]]]  # layer -> bits -> that variant's tensor keys
    rest_keys: list[str]  # the float (not quantized) tensors, loaded with load_state_dict


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(path: Path, field: str, value: Any, allowed: str) -> CheckpointError:
    return CheckpointError(f"{path}: {field} is {_short(value)}; allowed: {allowed}; {FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_pair(value: Any, item: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(item(v) for v in value)


# ------------------------------------------------------------------------------------------ config


def _check_fields(path: Path, config: dict[str, Any]) -> None:
    for key in ("adatsq_version", "method"):
        if not isinstance(config[key], str) or not config[key]:
            raise _bad(path, key, config[key], "a non-empty string")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("family"), str):
        raise _bad(path, "model", model, '{"family": str, "source": str or null}')
    if not isinstance(model.get("source"), (str, type(None))):
        raise _bad(path, "model.source", model.get("source"), "a string or null")
    act = config["activation"]
    if not isinstance(act, dict) or set(act) != {"bits"}:
        raise _bad(path, "activation", act, f'{{"bits": null or one of {list(ACT_BITS)}}}')
    if act["bits"] is not None and (not _is_int(act["bits"]) or act["bits"] not in ACT_BITS):
        raise _bad(path, "activation.bits", act["bits"], f"null or one of {list(ACT_BITS)}")
    if not isinstance(config["ignore"], list) or not all(isinstance(p, str) for p in config["ignore"]):
        raise _bad(path, "ignore", config["ignore"], "a list of strings")
    if not isinstance(config["recipe"], dict):
        raise _bad(path, "recipe", config["recipe"], "a JSON object")
    checksums = config.get("checksums", {})
    if not isinstance(checksums, dict) or not all(
        isinstance(v, str) and _SHA256.fullmatch(v) for v in checksums.values()
    ):
        raise _bad(path, "checksums", checksums, "{tensor key: 64 lowercase hex digits}")


def _check_schedule(path: Path, config: dict[str, Any]) -> None:
    steps = config["num_steps"]
    if not _is_int(steps) or steps < 1:
        raise _bad(path, "num_steps", steps, "a positive integer")
    timesteps = config["timesteps"]
    if not isinstance(timesteps, list) or len(timesteps) != steps or not all(map(_is_number, timesteps)):
        raise _bad(path, "timesteps", timesteps, f"a list of num_steps={steps} numbers")
    segments, ranges = config["segments"], config["segment_steps"]
    if not isinstance(segments, list) or not segments or not all(_is_pair(s, _is_number) for s in segments):
        raise _bad(path, "segments", segments, "a non-empty list of [t_first, t_last] number pairs")
    if not isinstance(ranges, list) or len(ranges) != len(segments):
        raise _bad(
            path, "segment_steps", ranges, f"a list of {len(segments)} [start, end) pairs (one per segment)"
        )
    start = 0
    for i, pair in enumerate(ranges):
        if not _is_pair(pair, _is_int) or pair[0] != start or pair[1] <= start or pair[1] > steps:
            raise _bad(path, f"segment_steps[{i}]", pair, f"[{start}, end) with {start} < end <= {steps}")
        expected = [timesteps[pair[0]], timesteps[pair[1] - 1]]
        if not all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(segments[i], expected, strict=True)
        ):
            raise _bad(path, f"segments[{i}]", segments[i], f"the timesteps of its steps {expected}")
        start = pair[1]
    if start != steps:
        raise _bad(path, "segment_steps", ranges, f"contiguous [start, end) pairs covering all {steps} steps")


def _check_layer(path: Path, name: str, layer: Any, segments: int) -> None:
    field = f"layers[{name!r}]"
    if not isinstance(layer, dict) or not LAYER_KEYS <= set(layer) <= LAYER_KEYS | OPTIONAL_LAYER_KEYS:
        keys = f"the keys {sorted(LAYER_KEYS)} and optionally {sorted(OPTIONAL_LAYER_KEYS)}"
        raise _bad(path, field, layer, f"an object with exactly {keys}")
    bits = layer["bits"]
    if not isinstance(bits, list) or len(bits) != segments or not all(_is_int(b) for b in bits):
        raise _bad(path, f"{field}.bits", bits, f"a list of {segments} ints (one per timestep segment)")
    wrong = [b for b in bits if b not in WEIGHT_BITS]
    if wrong:
        raise _bad(path, f"{field}.bits", bits, f"values in {list(WEIGHT_BITS)}")
    group = layer["group_size"]
    if group is not None and (not _is_int(group) or group <= 0):
        raise _bad(path, f"{field}.group_size", group, "null (per channel) or a positive integer")
    if not isinstance(layer["symmetric"], bool):
        raise _bad(path, f"{field}.symmetric", layer["symmetric"], "true or false")
    integer = layer.get("integer_group_scales", False)
    if not isinstance(integer, bool) or (integer and group is None):
        raise _bad(path, f"{field}.integer_group_scales", integer, "false, or true with a group_size")
    for key in ("in_features", "out_features"):
        if not _is_int(layer[key]) or layer[key] <= 0:
            raise _bad(path, f"{field}.{key}", layer[key], "a positive integer")


def check_config(path: Path, config: dict[str, Any]) -> None:
    """The schema of the adatsq config (its keys were checked by read_checkpoint_config)."""
    _check_fields(path, config)
    _check_schedule(path, config)
    if not isinstance(config["layers"], dict):
        raise _bad(path, "layers", config["layers"], "an object {layer name: {bits, group_size, ...}}")
    for name, layer in config["layers"].items():
        _check_layer(path, name, layer, len(config["segments"]))


# ------------------------------------------------------------------------------------------ tensors


def split_keys(config: dict[str, Any], keys: list[str]) -> tuple[dict[str, dict[int, list[str]]], list[str]]:
    """(layer -> bits -> its variant keys, the other keys)."""
    variants: dict[str, dict[int, list[str]]] = {name: {} for name in config["layers"]}
    rest = []
    for key in keys:
        match = _VARIANT_KEY.fullmatch(key)
        if match and match["layer"] in variants:
            variants[match["layer"]].setdefault(int(match["bits"]), []).append(key)
        else:
            rest.append(key)
    return variants, rest


def _tensor_error(files: TensorFiles, key: str, problem: str, allowed: str) -> CheckpointError:
    where = files.directory / files.weight_map[key] if key in files.weight_map else files.directory
    return CheckpointError(f"{where}: tensor {key!r} {problem}; allowed: {allowed}; {FIX}")


def _expected_buffers(layer: dict[str, Any], bits: int, buffers: dict[str, str], specs: Specs) -> dict:
    """buffer -> (allowed dtypes, shape) for one variant of a layer (lowrank rank read from lowrank_a)."""
    out, inp = layer["out_features"], layer["in_features"]
    groups = n_groups(inp, config_variant_grid(layer, bits)[0])
    expected = {
        "qweight": (("U8",), (out, packed_cols(inp, bits))),
        "scales": (("F16",), (out, groups)),
        "zeros": (("U8",), (out, groups)),
        "bias": (FLOATS, (out,)),
        "smooth": (FLOATS, (inp,)),
        "rotation_signs": (FLOATS, (inp,)),
        "channel_scales": (("F16",), (out,)),
    }
    if "lowrank_a" in buffers:
        shape = specs[buffers["lowrank_a"]][1]
        rank = shape[0] if len(shape) == 2 and shape[0] > 0 else 1
        expected["lowrank_a"] = (FLOATS, (rank, inp))
        expected["lowrank_b"] = (FLOATS, (out, rank))
    return expected


def _check_variant(
    name: str, layer: dict, bits: int, keys: list[str], files: TensorFiles, specs: Specs
) -> None:
    buffers = {key.rsplit(".", 1)[1]: key for key in keys}
    prefix = f"{name}.w{bits}."
    for buffer, key in sorted(buffers.items()):
        if buffer not in BUFFERS:
            raise _tensor_error(
                files, key, "is not a quantized-layer buffer", f"{prefix}{{{', '.join(sorted(BUFFERS))}}}"
            )
    for required in ("qweight", "scales", "zeros"):
        if required not in buffers:
            raise _tensor_error(
                files, prefix + required, "is missing", f"every {bits}-bit variant the config lists stores it"
            )
    if ("channel_scales" in buffers) != config_variant_grid(layer, bits)[1]:
        problem = "is present" if "channel_scales" in buffers else "is missing"
        where = "in the 2-6-bit variants of layers whose config sets integer_group_scales, nowhere else"
        raise _tensor_error(files, prefix + "channel_scales", problem, where)
    if ("lowrank_a" in buffers) != ("lowrank_b" in buffers):
        raise _tensor_error(
            files, prefix + "lowrank_a", "and lowrank_b are not both present", "both or neither"
        )
    geometry = (
        f"for layer {name!r} with in_features={layer['in_features']}, out_features={layer['out_features']}, "
    )
    geometry += f"{bits} bits, group_size={layer['group_size']}"
    if layer.get("integer_group_scales"):
        geometry += " on integer group scales (8-bit variants per channel)"
    for buffer, (dtypes, shape) in _expected_buffers(layer, bits, buffers, specs).items():
        if buffer in buffers:
            dtype, stored = specs[buffers[buffer]]
            if dtype not in dtypes or stored != shape:
                problem = f"is {dtype} {list(stored)}"
                raise _tensor_error(
                    files, buffers[buffer], problem, f"{'/'.join(dtypes)} {list(shape)} {geometry}"
                )


def check_quantized_tensors(
    config: dict[str, Any],
    variants: dict[str, dict[int, list[str]]],
    files: TensorFiles,
    specs: Specs,
    config_path: Path,
) -> None:
    """Every variant the config lists is stored, nothing else is, each with the dtypes and shapes it needs."""
    for name, layer in config["layers"].items():
        needed = set(layer["bits"])
        for bits in sorted(needed):
            if f"{name}.w{bits}.qweight" not in variants[name].get(bits, []):
                raise CheckpointError(
                    f"{config_path}: layer {name!r} has a {bits}-bit variant but tensor "
                    f"{name}.w{bits}.qweight is missing; allowed: the config's bits {layer['bits']}; {FIX}"
                )
        for bits, keys in sorted(variants[name].items()):
            if bits not in needed:
                problem = f"is a {bits}-bit variant layer {name!r} never uses"
                raise _tensor_error(files, sorted(keys)[0], problem, f"variants of the bits {layer['bits']}")
            _check_variant(name, layer, bits, keys, files, specs)


def check_model_tensors(
    config: dict[str, Any],
    denoiser: nn.Module,
    rest: list[str],
    files: TensorFiles,
    specs: Specs,
    config_path: Path,
) -> None:
    """The base model has each quantized layer in the config's shape and exactly the stored float tensors."""
    for name, layer in config["layers"].items():
        try:
            weight = denoiser.get_submodule(name).weight
        except AttributeError:
            raise _bad(config_path, f"layers[{name!r}]", name, "Linear layers of the base model") from None
        shape = (layer["out_features"], layer["in_features"])
        if tuple(weight.shape) != shape:
            raise _bad(config_path, f"layers[{name!r}] (out_features, in_features)", shape,
                       f"{tuple(weight.shape)}, the layer's shape in the base model")  # fmt: skip
    quantized = tuple(f"{name}." for name in config["layers"])
    state = {k: v for k, v in denoiser.state_dict().items() if not k.startswith(quantized)}
    unexpected = sorted(set(rest) - set(state))
    if unexpected:
        raise _tensor_error(
            files, unexpected[0], "is not a tensor of the model", "the base model's state_dict keys"
        )
    missing = sorted(set(state) - set(rest))
    if missing:
        raise _tensor_error(files, missing[0], "is missing", "every float tensor of the model is stored")
    for key in rest:
        dtype, shape = specs[key]
        want = state[key]
        allowed = (
            FLOATS
            if want.is_floating_point()
            else tuple(k for k, v in TORCH_DTYPES.items() if v == want.dtype)
        )
        if dtype not in allowed or shape != tuple(want.shape):
            raise _tensor_error(
                files,
                key,
                f"is {dtype} {list(shape)}",
                f"{'/'.join(allowed)} {list(want.shape)} (the model's)",
            )


def check_checksums(
    config: dict[str, Any], files: TensorFiles, specs: Specs, verify: bool, path: Path
) -> None:
    """The config's checksums cover exactly the stored tensors; with `verify`, every tensor's bytes match."""
    if "checksums" not in config:
        return  # written before checksums were recorded
    checksums = config["checksums"]
    extra, uncovered = sorted(set(checksums) - set(specs)), sorted(set(specs) - set(checksums))
    if extra:
        raise _bad(
            path,
            f"checksums[{extra[0]!r}]",
            checksums[extra[0]],
            "checksums of stored tensors only (the tensor is missing)",
        )
    if uncovered:
        problem = f"has no checksum in {path.name}"
        raise _tensor_error(files, uncovered[0], problem, "tensors the config records")
    if verify and not files.files_verified:  # a verified shard set was hashed whole already
        files.verify_checksums(checksums)


def _load_base(config: dict[str, Any], base: Path) -> ModelAdapter:
    cls = adapter_class(config["model"]["family"])
    try:
        return cls.load_base(base)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(
            f"{base} does not rebuild the {config['model']['family']!r} model ({_short(detail)}); {FIX}"
        ) from None


def open_checkpoint(directory: str | Path, verify: bool = True) -> OpenedCheckpoint:
    """Validate a folder (config, tensor headers, base model, checksums) before any tensor is used."""
    config, layout = read_checkpoint_config(Path(directory))
    path = layout.config_path
    check_config(path, config)
    files = TensorFiles(layout.tensors, verify)
    specs = files.specs()
    variants, rest = split_keys(config, list(specs))
    check_quantized_tensors(config, variants, files, specs, path)
    adapter = _load_base(config, layout.base)
    check_model_tensors(config, adapter.denoiser(), rest, files, specs, path)
    check_checksums(config, files, specs, verify, path)
    return OpenedCheckpoint(config, layout, files, adapter, variants, rest)
