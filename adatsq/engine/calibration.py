"""AdaTSQ's calibration: per-segment statistics plus temporal Fisher weights, reused by the planner's
candidates and error table and by the final Fisher-weighted GPTQ solves.

Without a memory budget (one process) the statistics are gathered in one live run and held; under
`calibration.max_memory` or several processes they are record / replay passes (`engine.passes`) that
the planner iterates twice, so no more than one pass's statistics exist at any time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.fisher import fisher_weights, segment_weights
from adatsq.calibrate.segments import SegmentMap
from adatsq.engine.passes import layer_statistics
from adatsq.engine.surgery import select_layers
from adatsq.errors import PlanError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_for
from adatsq.recipe import Recipe


@dataclass
class Calibration:
    """What one calibration pass yields; planning and the final GPTQ solves both reuse it."""

    adapter: ModelAdapter
    layers: dict[str, nn.Linear]
    segments: SegmentMap
    statistics: Iterable[dict[str, LayerStats]]  # groups of layers' statistics, re-iterable
    step_weights: torch.Tensor  # Fisher weight per sampler step (sums to 1)
    fisher_method: str
    seconds: float
    inputs: int  # calibration inputs sampled
    resume: Path | None = None  # where an interrupted run keeps its progress (held sums or solved shares)

    @property
    def weights(self) -> torch.Tensor:
        """Fisher weight per segment."""
        return segment_weights(self.step_weights, self.segments.step_ranges)


def calibrate(
    model: Any,
    recipe: Recipe,
    inputs: Sequence[Any] | None = None,
    progress: bool = True,
    known_weights: Sequence[float] | None = None,
    resume: Path | None = None,
) -> Calibration:
    """Per-segment statistics plus temporal Fisher weights (uniform when the recipe turns Fisher off).

    `known_weights` (per segment, e.g. from a plan file) skip the Fisher estimate.
    """
    start = time.perf_counter()
    cal = recipe.calibration
    adapter = adapter_for(model)
    layers = select_layers(adapter, recipe)
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), cal.segments)
    inputs = list(inputs) if inputs is not None else adapter.default_inputs(cal.samples, cal.seed)
    statistics = layer_statistics(
        adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=cal.seed,
        budget=cal.max_memory_bytes, progress=progress, resume=resume,
    )  # fmt: skip
    if known_weights is not None:
        step_weights, method = _spread(known_weights, segments), "plan"
    elif recipe.planner.fisher:
        fisher_inputs = inputs[: recipe.planner.fisher_samples]
        step_weights, method = fisher_weights(
            adapter,
            fisher_inputs,
            cal.steps,
            seed=cal.seed,
            batch_size=cal.batch_size,
            progress=progress,
            method=recipe.planner.fisher_method,
        )
    else:
        step_weights, method = torch.full((cal.steps,), 1.0 / cal.steps), "uniform"
    return Calibration(
        adapter,
        layers,
        segments,
        statistics,
        step_weights,
        method,
        time.perf_counter() - start,
        len(inputs),
        resume,
    )


def _spread(segment_weights: Sequence[float], segments: SegmentMap) -> torch.Tensor:
    """Per-step weights whose segment sums are `segment_weights` (equal share inside a segment)."""
    if len(segment_weights) != segments.count:
        raise PlanError(
            f"{len(segment_weights)} segment weights for {segments.count} segments; "
            "the plan was made for another segmentation"
        )
    out = torch.zeros(len(segments.timesteps))
    for w, (start, end) in zip(segment_weights, segments.step_ranges, strict=True):
        out[start:end] = w / (end - start)
    return out
