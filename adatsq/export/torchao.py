"""torchao FqnToConfig recipe (torchao 0.18's config_to_dict JSON): a re-quantization recipe per module.

`torchao.core.config.config_from_dict(json.load(f))` rebuilds it and `quantize_(model, config)` applies
it to the float model: torchao rounds the float weights itself (min-max RTN), so adatsq's GPTQ codes are
not kept, only each layer's scheme. Weight-only layers map to IntxWeightOnlyConfig. A8 layers (adatsq:
symmetric dynamic per-token int8) map to Int8DynamicActivationInt8WeightConfig (the same scheme) when
the weight is 8-bit symmetric per channel; otherwise to Int8DynamicActivationIntxWeightConfig, whose
per-token activations torchao 0.18 makes asymmetric only (it asserts so): the output says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adatsq.core.io import write_json
from adatsq.errors import ExportError
from adatsq.export.base import (
    EXPORTERS,
    Exporter,
    ExportOptions,
    ExportSource,
    LayerExport,
    Written,
    integer_scales_lost,
)
from adatsq.quant.scheme import n_groups

FILE = "torchao_config.json"


def _node(kind: str, data: Any, version: int | None = None) -> dict[str, Any]:
    """One object in torchao's serialized form: {"_type", ("_version"), "_data"}."""
    node: dict[str, Any] = {"_type": kind}
    if version is not None:
        node["_version"] = version
    node["_data"] = data
    return node


def granularity(layer: LayerExport) -> dict[str, Any]:
    per_channel = layer.group_size is None or (
        layer.in_features is not None and n_groups(layer.in_features, layer.group_size) == 1
    )
    if per_channel:
        return _node("PerAxis", {"axis": 0}, 1)
    return _node("PerGroup", {"group_size": layer.group_size}, 1)


def layer_config(layer: LayerExport) -> dict[str, Any]:
    dtype = _node("torch.dtype", f"int{layer.bits}")
    mapping = _node("MappingType", "SYMMETRIC" if layer.symmetric else "ASYMMETRIC")
    if layer.act_bits is None:
        data = {"weight_dtype": dtype, "granularity": granularity(layer), "mapping_type": mapping}
        return _node("IntxWeightOnlyConfig", data, 2)
    if exact_a8(layer):
        data = {
            "act_mapping_type": _node("MappingType", "SYMMETRIC"),
            "granularity": _node("PerRow", {"dim": -1}, 1),
        }
        return _node("Int8DynamicActivationInt8WeightConfig", data, 2)
    data = {"weight_dtype": dtype, "weight_granularity": granularity(layer), "weight_mapping_type": mapping,
            "act_mapping_type": _node("MappingType", "ASYMMETRIC")}  # fmt: skip
    return _node("Int8DynamicActivationIntxWeightConfig", data, 2)


def exact_a8(layer: LayerExport) -> bool:
    """W8A8 symmetric per channel: torchao's int8 x int8 config (per-token, per-row) is that scheme."""
    per_channel = granularity(layer)["_type"] == "PerAxis"
    return layer.act_bits == 8 and layer.bits == 8 and layer.symmetric and per_channel


def fqn_to_config(source: ExportSource) -> dict[str, Any]:
    configs = {name: layer_config(layer) for name, layer in sorted(source.layers.items())}
    return _node("FqnToConfig", {"fqn_to_config": configs}, 1)


@EXPORTERS.register("torchao")
class TorchAOExporter(Exporter):
    name = "torchao"
    reads_plans = True

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        super().check(source, options)
        for layer in source.layers.values():
            if layer.act_bits not in (None, 8):
                raise ExportError(
                    f"layer {layer.name!r} quantizes activations to {layer.act_bits} bits; torchao's intx "
                    "recipes take int8 per-token activations or none"
                )
            known = layer.in_features is not None and layer.group_size is not None
            if (
                known
                and n_groups(layer.in_features, layer.group_size) > 1
                and layer.in_features % layer.group_size
            ):
                raise ExportError(
                    f"layer {layer.name!r}: in_features {layer.in_features} is not a multiple of group_size "
                    f"{layer.group_size}; torchao's PerGroup needs whole groups"
                )

    def write(self, source: ExportSource, options: ExportOptions, folder: Path) -> Written:
        write_json(folder / FILE, fqn_to_config(source))
        loses = ["adatsq's GPTQ codes: torchao re-quantizes the float weights (RTN) with this recipe",
                 "the timestep axis: one bit-width per layer (" + source.selection_text + ")"]  # fmt: skip
        if any(layer.act_bits and not exact_a8(layer) for layer in source.layers.values()):
            loses.append(
                "symmetric per-token activations: torchao's int8 x intx config quantizes them asymmetrically"
            )
        if source.kind == "plan":
            loses.append("group size / symmetry come from --recipe (or the defaults), not from the plan")
        loses += integer_scales_lost(source, "the re-quantization solves free group scales")
        keeps = ["bits, grouping and symmetry of every layer"]
        if any(layer.act_bits for layer in source.layers.values()):
            keeps.append("int8 dynamic per-token activations")
        return Written(
            description="torchao FqnToConfig re-quantization recipe",
            files=(FILE,),
            keeps=tuple(keeps),
            loses=tuple(loses),
        )
