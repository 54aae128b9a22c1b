"""Read what `adatsq export` converts: a checkpoint folder (validated like `load`) or a plan.json.

The segment selection is applied here, once, so every target sees one variant per layer. It must be
given explicitly (`--segment K` or `--max`) whenever some layer switches bits across timestep segments:
neither choice is neutral (one reproduces the model at one segment, the other is the most accurate and
the largest), and picking one silently would hide that the export drops the timestep axis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from adatsq.checkpoint.format import config_variant_grid
from adatsq.checkpoint.validate import open_checkpoint
from adatsq.errors import CheckpointError, ConfigError
from adatsq.export.base import TRANSFORM_BUFFERS, ExportSource, LayerExport, Selection
from adatsq.plan.schema import UNQUANTIZED_ACT_BITS, load_plan
from adatsq.quant.scheme import WeightScheme, variant_grid


def _selection(rows: dict[str, tuple[int, ...]], selection: Selection | None, num_segments: int, what: str):
    """(the selection in force, how it reads); None is allowed only when no layer switches bits."""
    switching = [name for name, row in rows.items() if len(set(row)) > 1]
    if selection is None:
        if switching:
            raise ConfigError(
                f"layer {switching[0]!r} (and {len(switching) - 1} more) of {what} switches bits across "
                f"its {num_segments} timestep segments; pass --segment K (0..{num_segments - 1}: the variant "
                "used at that segment) or --max (each layer's widest variant)"
            )
        return Selection(), "each layer's only variant (no layer switches bits)"
    selection.check(num_segments, what)
    if selection.segment is None:
        return selection, f"each layer's widest variant (--max) of {num_segments} timestep segment(s)"
    return selection, f"the variant of timestep segment {selection.segment} (of 0..{num_segments - 1})"


def _model_config(denoiser: nn.Module) -> dict[str, Any]:
    """The denoiser's own config.json (diffusers models), or {} for a model without one."""
    to_json = getattr(denoiser, "to_json_string", None)
    return json.loads(to_json()) if callable(to_json) else {}


def read_checkpoint(directory: Path, selection: Selection | None, verify: bool = True) -> ExportSource:
    opened = open_checkpoint(directory, verify)
    config = opened.config
    rows = {name: tuple(layer["bits"]) for name, layer in config["layers"].items()}
    chosen, text = _selection(rows, selection, len(config["segments"]), f"checkpoint {str(directory)!r}")
    layers = {}
    for name, layer in config["layers"].items():
        bits = chosen.pick(rows[name])
        buffers = {key.rsplit(".", 1)[1] for key in opened.variant_keys[name][bits]}
        group, integer = config_variant_grid(layer, bits)
        layers[name] = LayerExport(
            name, bits, rows[name], group, layer["symmetric"], config["activation"]["bits"],
            layer["in_features"], layer["out_features"], tuple(b for b in TRANSFORM_BUFFERS if b in buffers),
            integer,
        )  # fmt: skip
    denoiser = opened.adapter.denoiser()
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return ExportSource(
        kind="checkpoint",
        path=directory,
        family=config["model"]["family"],
        selection=chosen,
        selection_text=text,
        segment_steps=[list(pair) for pair in config["segment_steps"]],
        layers=layers,
        recipe=config["recipe"],
        float_linears=tuple(sorted(linears)),
        model_config=_model_config(denoiser),
        files=opened.files,
        rest_keys=tuple(opened.rest_keys),
    )


def read_plan(path: Path, selection: Selection | None, weight: WeightScheme | None = None) -> ExportSource:
    """A plan has bits only: group size and symmetry come from `weight` (a recipe's), else the defaults."""
    plan = load_plan(path)
    weight = weight or WeightScheme()
    chosen, text = _selection(plan.layers, selection, plan.num_segments, f"plan {str(path)!r}")
    layers = {}
    for name, row in plan.layers.items():
        act = plan.act_bits_of(name)
        bits = chosen.pick(row)
        group, integer = variant_grid(weight.group_size, weight.integer_group_scales, bits)
        layers[name] = LayerExport(
            name, bits, row, group, weight.symmetric, None if act == UNQUANTIZED_ACT_BITS else act,
            integer_group_scales=integer,
        )  # fmt: skip
    return ExportSource(
        kind="plan",
        path=path,
        family=plan.model["family"],
        selection=chosen,
        selection_text=text,
        segment_steps=[list(pair) for pair in plan.segments],
        layers=layers,
    )


def read_source(
    path: Path, selection: Selection | None, verify: bool = True, weight: WeightScheme | None = None
) -> ExportSource:
    """A checkpoint folder, or a plan .json file (whose group size / symmetry `weight` gives)."""
    if path.suffix == ".json" and not path.is_dir():
        return read_plan(path, selection, weight)
    if weight is not None:
        raise ConfigError("--recipe only applies to a plan.json source: a checkpoint fixes its own scheme")
    if not path.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is neither a checkpoint folder nor a plan .json file; create one with "
            "`adatsq quantize` (or `adatsq plan`)"
        )
    return read_checkpoint(path, selection, verify)
