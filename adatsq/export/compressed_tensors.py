"""compressed-tensors (schema of release 0.20): the GPTQ codes themselves, repacked, never re-quantized.

How adatsq's grid maps (checked against compressed-tensors' own pack / decompress in the tests):
* compressed-tensors stores a b-bit weight as a signed value q = code - 2**(b-1) and dequantizes
  (q - z) * scale with the signed zero point z = zero - 2**(b-1): the same (code - zero) * scale.
  Symmetric layers have zero = 2**(b-1), i.e. z = 0, which is what a symmetric scheme means there
  (no zero point is stored).
* pack-quantized packs each row as a dense little-endian bitstream of q + 2**(b-1) = code in int32 words,
  for any b in 1..8: adatsq's packed row (the same bitstream in bytes) zero-padded to whole words and
  viewed as int32 is `weight_packed`, byte for byte. Asymmetric zero points are packed the same way
  along the output dimension.
* A scheme with input activations is what compressed-tensors calls int-quantized: the weight is stored
  unpacked as int8 q (its model-free tools infer that format whatever the config says, so we write it).
* Activations: adatsq's dynamic symmetric per-token int8 is the `token` strategy with dynamic=true.
  vLLM's int8 kernels use the same grid (absmax / 127); compressed-tensors' own python fake-quant divides
  by 127.5 over [-128, 127], so its simulated forward rounds a little differently.
Not representable (refused): 4-bit activations, input transforms, a partial last group.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from adatsq.checkpoint.format import WEIGHTS, variant_prefix
from adatsq.checkpoint.shards import DEFAULT_MAX_SHARD, write_tensors
from adatsq.core.io import write_json
from adatsq.core.sizes import parse_size
from adatsq.errors import CheckpointError, ExportError
from adatsq.export.base import (
    EXPORTERS,
    SCALE_DTYPES,
    Exporter,
    ExportOptions,
    ExportSource,
    LayerExport,
    Written,
    bits_summary,
    integer_scales_lost,
)
from adatsq.quant.pack import pack, unpack
from adatsq.quant.scheme import n_groups

SCHEMA_VERSION = "0.20.1"  # the compressed-tensors release whose config schema and tensor names this writes
PACKED, UNPACKED = "pack-quantized", "int-quantized"
MODEL_CONFIG = "config.json"
TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def strategy(layer: LayerExport) -> tuple[str, int | None]:
    """(compressed-tensors strategy, group_size): one group over the whole row is per channel."""
    if layer.group_size is None or n_groups(layer.in_features, layer.group_size) == 1:
        return "channel", None
    if layer.in_features % layer.group_size:
        raise ExportError(
            f"layer {layer.name!r}: in_features {layer.in_features} is not a multiple of group_size "
            f"{layer.group_size} (adatsq keeps a partial last group; compressed-tensors' group strategy "
            "cannot); quantize with a group size that divides it"
        )
    return "group", layer.group_size


def int32_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 rows [R, C] -> int32 [R, ceil(C / 4)]: zero-padded little-endian words of the same bits."""
    rows, cols = packed.shape
    padded = torch.zeros(rows, -(-cols // 4) * 4, dtype=torch.uint8)
    padded[:, :cols] = packed
    return padded.view(torch.int32)


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def layer_tensors(
    source: ExportSource, layer: LayerExport, packed: bool, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors (local names) from its chosen adatsq variant."""
    prefix, bits = variant_prefix(layer.name, layer.bits), layer.bits
    qweight, zeros = source.tensor(prefix + "qweight"), source.tensor(prefix + "zeros")
    if layer.symmetric and not bool((zeros == 2 ** (bits - 1)).all()):
        raise CheckpointError(
            f"layer {layer.name!r} is marked symmetric but its {bits}-bit zero points are not all "
            f"{2 ** (bits - 1)}; the checkpoint is inconsistent: re-run quantize"
        )
    out: dict[str, torch.Tensor] = {}
    if packed:
        out["weight_packed"] = int32_words(qweight)
        out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if not layer.symmetric:  # packed along the output dimension: [ceil(out * bits / 32), n_groups]
            out["weight_zero_point"] = int32_words(pack(zeros.t().contiguous(), bits)).t().contiguous()
    else:
        out["weight"] = _signed(unpack(qweight, bits, layer.in_features), bits)
        if not layer.symmetric:
            out["weight_zero_point"] = _signed(zeros, bits)
    out["weight_scale"] = source.tensor(prefix + "scales").to(scale_dtype)
    if prefix + "bias" in source.files.weight_map:
        out["bias"] = source.tensor(prefix + "bias")
    return out


def _weights_args(layer: LayerExport, actorder: bool) -> dict[str, Any]:
    kind, group_size = strategy(layer)
    args = {"num_bits": layer.bits, "type": "int", "symmetric": layer.symmetric, "group_size": group_size}
    args |= {"strategy": kind, "dynamic": False}
    if actorder:  # GPTQ's column order during calibration only: groups stay contiguous, no g_idx
        args["actorder"] = "weight"
    return args


def quantization_config(source: ExportSource) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct (bits, grouping, symmetry)."""
    gptq = (source.recipe or {}).get("gptq") or {}
    actorder = (
        source.recipe is not None and source.recipe.get("method") != "rtn" and bool(gptq.get("act_order"))
    )
    groups: dict[str, dict[str, Any]] = {}
    for name in sorted(source.layers):
        layer = source.layers[name]
        weights = _weights_args(layer, actorder)
        key = repr(sorted(weights.items()))
        if key not in groups:
            fmt = PACKED if layer.act_bits is None else UNPACKED
            acts = None if layer.act_bits is None else dict(TOKEN_INT8)
            groups[key] = {"targets": [], "weights": weights, "input_activations": acts,
                           "output_activations": None, "format": fmt}  # fmt: skip
        groups[key]["targets"].append(name)
    formats = {group["format"] for group in groups.values()}
    ordered = sorted(groups.values(), key=lambda g: (g["weights"]["num_bits"], g["targets"][0]))
    return {
        "quant_method": "compressed-tensors",
        "version": SCHEMA_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(ordered)},
        "ignore": list(source.float_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


@EXPORTERS.register("compressed-tensors")
class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        super().check(source, options)
        if sys.byteorder != "little":
            raise ExportError("compressed-tensors export needs a little-endian host (int32 words are native)")
        for layer in source.layers.values():
            if layer.act_bits not in (None, 8):
                raise ExportError(
                    f"layer {layer.name!r} quantizes activations to {layer.act_bits} bits; compressed-"
                    "tensors maps only dynamic per-token int8 (A8) or float activations: export a W-only or "
                    "A8 checkpoint"
                )
            strategy(layer)

    def write(self, source: ExportSource, options: ExportOptions, folder: Path) -> Written:
        scale_dtype = SCALE_DTYPES[options.scale_dtype]
        qconfig = quantization_config(source)
        packed = {n for g in qconfig["config_groups"].values() if g["format"] == PACKED for n in g["targets"]}
        tensors = {key: source.tensor(key) for key in source.rest_keys}
        for name, layer in source.layers.items():
            local = layer_tensors(source, layer, name in packed, scale_dtype)
            tensors.update({f"{name}.{key}": value for key, value in local.items()})
        written = write_tensors(folder, tensors, parse_size(DEFAULT_MAX_SHARD))
        config = dict(source.model_config)
        config["quantization_config"] = qconfig
        config["adatsq_export"] = {"selection": source.selection_text, "bits": bits_summary(source.layers)}
        write_json(folder / MODEL_CONFIG, config)
        n_groups_ = len(qconfig["config_groups"])
        acts = {layer.act_bits for layer in source.layers.values()} - {None}
        keeps = [
            "the GPTQ integer codes, scales and zero points bit for bit (no re-quantization)",
            f"weight_scale in {options.scale_dtype}",
            "biases and every float tensor as stored",
        ]
        if acts:
            keeps.append("activations: dynamic symmetric per-token int8 (strategy token, dynamic)")
        loses = ["the timestep axis: one variant per layer (" + source.selection_text + ")"]
        if any(layer.act_bits and layer.bits < 8 for layer in source.layers.values()):
            loses.append("packing: int-quantized (A8) layers store each sub-8-bit code in a whole int8")
        loses += integer_scales_lost(source, "stored as their float16 products (the same weights), "
                                     "which compressed-tensors runs as free group scales")  # fmt: skip
        return Written(
            description=f"compressed-tensors {qconfig['format']}, {n_groups_} config group(s), "
            f"{written} bytes",
            files=(MODEL_CONFIG, WEIGHTS if (folder / WEIGHTS).exists() else "model-*.safetensors"),
            keeps=tuple(keeps),
            loses=tuple(loses),
        )
