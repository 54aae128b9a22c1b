"""Calibration within a memory budget: record the sampler once, then capture + solve groups of layers.

Each pass replays the recorded denoiser calls with hooks on its group only (stopping after the group's
deepest layer), solves the group's variants, keeps them on the host and frees the group's XᵀX before
the next pass. The float layers stay in place until every pass has run, so every layer sees the float
model's activations whatever the grouping: the checkpoint does not depend on the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from adatsq.calibrate.capture import LayerStats, StatsCapture
from adatsq.calibrate.record import Recording, record_calls, replay
from adatsq.calibrate.segments import SegmentMap
from adatsq.core.sizes import format_size
from adatsq.errors import CalibrationError, ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.models.layers import shared_input_groups
from adatsq.quant.workspace import gptq_workspace_bytes

log = logging.getLogger(__name__)


def accumulator_bytes(linear: nn.Linear, segments: int) -> int:
    """What StatsCapture holds for one layer: float64 XᵀX and float32 channel maxima per segment."""
    return segments * (8 * linear.in_features**2 + 4 * linear.in_features + 8)


def solve_bytes(linear: nn.Linear) -> int:
    """Peak working memory of one GPTQ solve of this layer (measured: quant/workspace.py)."""
    return gptq_workspace_bytes(linear.in_features, linear.out_features)


def group_bytes(layers: dict[str, nn.Linear], group: tuple[str, ...], segments: int) -> int:
    """One accumulator per shared input: the group's members read the same tensor."""
    return accumulator_bytes(layers[group[0]], segments)


def check_budget(layers: dict[str, nn.Linear], segments: int, budget: int) -> None:
    """Before any work: the budget must hold the largest single accumulator plus its solve."""

    def alone(group: tuple[str, ...]) -> int:
        return group_bytes(layers, group, segments) + max(solve_bytes(layers[n]) for n in group)

    worst = max(shared_input_groups(list(layers)), key=alone)
    if alone(worst) > budget:
        raise ConfigError(
            f"the memory budget ({format_size(budget)}) is below what layer {worst[0]!r} alone needs: "
            f"{format_size(alone(worst))} for its statistics over {segments} segment(s) plus its solve; "
            f"the smallest feasible budget is {alone(worst)} bytes"
        )


@dataclass(frozen=True)
class Pass:
    layers: tuple[str, ...]  # the layers solved after this pass (shared-input groups kept together)
    stop_after: str  # replay stops after this layer: the last one whose group's input is still needed
    bytes: int  # the pass's accumulators (one per shared input) + the largest solve among its layers


def plan_passes(
    layers: dict[str, nn.Linear], order: Sequence[str], segments: int, budget: int | None
) -> list[Pass]:
    """Consecutive groups of accumulators (in execution order) whose state fits `budget`; one pass without.

    Layers that read one input share one accumulator (models.layers.shared_input_groups), filled by the
    member that runs first, so a group is placed and counted once, at that member.
    """
    missing = [name for name in layers if name not in order]
    if missing:
        raise CalibrationError(
            f"{len(missing)} layer(s) never ran during calibration (e.g. {missing[0]!r}); "
            "they are not on the sampling path: add them to the recipe's ignore list"
        )
    position = {name: i for i, name in enumerate(order)}
    groups = sorted(shared_input_groups(list(layers)), key=lambda g: min(position[n] for n in g))

    def need(units: list[tuple[str, ...]]) -> int:
        return sum(group_bytes(layers, g, segments) for g in units) + max(
            solve_bytes(layers[n]) for g in units for n in g
        )

    def make(units: list[tuple[str, ...]]) -> Pass:
        first_reader = [min(g, key=position.__getitem__) for g in units]
        return Pass(
            tuple(n for g in units for n in g), max(first_reader, key=position.__getitem__), need(units)
        )

    if budget is not None:
        check_budget(layers, segments, budget)
    passes, units = [], []
    for group in groups:
        if units and budget is not None and need([*units, group]) > budget:
            passes.append(make(units))
            units = []
        units.append(group)
    passes.append(make(units))
    return passes


def capture_pass(
    adapter: ModelAdapter,
    recording: Recording,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    stop_after: str,
    progress: bool,
) -> dict[str, LayerStats]:
    """Statistics of `layers` from one replay of the recording, stopping after layer `stop_after`."""
    capture = StatsCapture(layers, segments.count)
    with capture:
        replay(
            adapter.denoiser(),
            recording,
            lambda call: capture.set_position(call.segment, call.step),
            stop_after=layers[stop_after],
            progress=progress,
        )
    return capture.finish()


def budgeted_passes(
    adapter: ModelAdapter,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    budget: int,
    progress: bool,
) -> Iterator[dict[str, LayerStats]]:
    """Record once, then yield the statistics of one group of layers at a time (freed when dropped)."""
    check_budget(layers, segments.count, budget)
    recording = record_calls(adapter, segments, inputs, batch_size=batch_size, seed=seed, progress=progress)
    passes = plan_passes(layers, recording.linear_order, segments.count, budget)
    log.info(
        "calibration in %d pass(es) under %s; recorded %d denoiser calls (%s on the host)",
        len(passes),
        format_size(budget),
        len(recording.calls),
        format_size(recording.nbytes()),
    )
    for index, group in enumerate(passes):
        log.info(
            "pass %d/%d: %d layers, %s", index + 1, len(passes), len(group.layers), format_size(group.bytes)
        )
        yield capture_pass(
            adapter, recording, {n: layers[n] for n in group.layers}, segments, group.stop_after, progress
        )
