"""optimum-quanto quanto_qmap.json: which qtype each Linear gets, as a re-quantization recipe.

quanto 0.2.7's `requantize(model, state_dict, qmap)` needs the weights already in quanto's own layout,
and quanto fixes each layer's group size itself (128, lowered by 32 until it divides in_features, per
channel when in_features <= 128) with its own grid, so adatsq's codes fit it only by chance: the qmap is
exported alone, to be applied with `quantize(model, weights=qtype, include=[names])` + `freeze`.
"""

from __future__ import annotations

from pathlib import Path

from adatsq.core.io import write_json
from adatsq.errors import ExportError
from adatsq.export.base import EXPORTERS, Exporter, ExportOptions, ExportSource, Written, integer_scales_lost

FILE = "quanto_qmap.json"
QTYPES = {2: "qint2", 4: "qint4", 8: "qint8"}  # quanto's integer weight types


def qmap(source: ExportSource) -> dict[str, dict[str, str]]:
    return {
        name: {"weights": QTYPES[layer.bits], "activations": "none"}
        for name, layer in sorted(source.layers.items())
    }


@EXPORTERS.register("quanto")
class QuantoExporter(Exporter):
    name = "quanto"
    reads_plans = True

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        super().check(source, options)
        for layer in source.layers.values():
            if layer.bits not in QTYPES:
                raise ExportError(
                    f"layer {layer.name!r} exports {layer.bits}-bit weights; quanto has "
                    f"{', '.join(f'{v} ({b} bits)' for b, v in QTYPES.items())} only"
                )

    def write(self, source: ExportSource, options: ExportOptions, folder: Path) -> Written:
        write_json(folder / FILE, qmap(source))
        loses = [
            "adatsq's GPTQ codes: quanto re-quantizes the float weights (its own min-max and group size)",
            "group size and symmetry: quanto chooses them per qtype and layer shape",
            "the timestep axis: one bit-width per layer (" + source.selection_text + ")",
        ]
        if any(layer.act_bits for layer in source.layers.values()):
            loses.append("activation quantization: quanto has only static calibrated activation scales")
        loses += integer_scales_lost(source, "the re-quantization solves free group scales")
        return Written(
            description="optimum-quanto qmap (re-quantization recipe)",
            files=(FILE,),
            keeps=("the weight bit-width of every layer (qint2 / qint4 / qint8)",),
            loses=tuple(loses),
        )
