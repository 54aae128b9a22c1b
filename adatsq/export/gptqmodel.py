"""GPTQModel quantize_config.json: a re-quantization recipe with per-module `dynamic` overrides.

GPTQModel re-runs GPTQ from the float weights with this config: the base bits / group_size / sym are the
most common choice among the layers, every other layer gets a `+:^name$` override, and float Linear layers
a `-:^name$` skip. The schema follows GPTQModel 7.7's QuantizeConfig.to_dict (checked against its
documented format only: GPTQModel does not install here). adatsq's GPTQ codes are not exported.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from adatsq.core.io import write_json
from adatsq.core.version import __version__
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

FILE = "quantize_config.json"
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what GPTQModel's QuantizeConfig accepts
PLANAR_BITS = (5, 6, 7)  # GPTQModel stores these only in its planar layout, format "gptq_p"


def scheme(layer: LayerExport) -> dict[str, Any]:
    return {"bits": layer.bits, "group_size": -1 if layer.group_size is None else layer.group_size,
            "sym": layer.symmetric}  # fmt: skip


def exact(name: str) -> str:
    """A pattern GPTQModel treats as one literal module name (its fast path: ^...$ with escapes only)."""
    return f"^{re.escape(name)}$"


def quantize_config(source: ExportSource) -> dict[str, Any]:
    schemes = {name: scheme(layer) for name, layer in sorted(source.layers.items())}
    counts = Counter(tuple(s.items()) for s in schemes.values())
    base = dict(max(counts, key=lambda items: (counts[items], -dict(items)["bits"])))
    dynamic: dict[str, dict[str, Any]] = {f"-:{exact(name)}": {} for name in source.float_linears}
    dynamic |= {f"+:{exact(name)}": s for name, s in schemes.items() if s != base}
    planar = any(s["bits"] in PLANAR_BITS for s in schemes.values())
    fmt = "gptq_p" if planar else "gptq"
    meta: dict[str, Any] = {"quantizer": [f"adatsq:{__version__}"], "static_groups": True}
    config: dict[str, Any] = {**base, "dynamic": dynamic or None, "lm_head": False}
    gptq = (source.recipe or {}).get("gptq")
    if gptq:
        config["desc_act"] = bool(gptq["act_order"])
        meta["damp_percent"] = gptq["damping"]
    meta["adatsq_export"] = {"selection": source.selection_text, "source": str(source.path)}
    config |= {"method": "gptq", "quant_method": "gptq", "format": fmt, "checkpoint_format": fmt}
    config |= {"pack_dtype": "int32", "meta": meta}
    return {key: value for key, value in config.items() if value is not None}


@EXPORTERS.register("gptqmodel")
class GPTQModelExporter(Exporter):
    name = "gptqmodel"
    reads_plans = True

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        super().check(source, options)
        for layer in source.layers.values():
            if scheme(layer)["group_size"] not in GROUP_SIZES:
                raise ExportError(
                    f"layer {layer.name!r} has group_size {layer.group_size}; GPTQModel accepts "
                    f"{list(GROUP_SIZES)} (-1 = per channel)"
                )

    def write(self, source: ExportSource, options: ExportOptions, folder: Path) -> Written:
        config = quantize_config(source)
        write_json(folder / FILE, config)
        loses = ["adatsq's GPTQ codes: GPTQModel re-quantizes the float weights with this config",
                 "the timestep axis: one bit-width per layer (" + source.selection_text + ")"]  # fmt: skip
        if any(layer.act_bits for layer in source.layers.values()):
            loses.append(
                "activation quantization: GPTQModel's config here is weight-only (activations float)"
            )
        loses += integer_scales_lost(source, "the re-quantization solves free group scales")
        overrides = sum(key.startswith("+:") for key in config.get("dynamic", {}))
        return Written(
            description=f"GPTQModel re-quantization config (format {config['format']}, {overrides} "
            "per-module overrides; unchecked against GPTQModel itself)",
            files=(FILE,),
            keeps=("bits, group size and symmetry of every layer", "float layers as `-:` skips"),
            loses=tuple(loses),
        )
