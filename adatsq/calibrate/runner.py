"""Run the model's own sampler over calibration inputs while StatsCapture listens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats, StatsCapture
from adatsq.calibrate.distributed import reduce_, shard
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter
from adatsq.timesteps import SegmentMap, install_segment_hook

log = logging.getLogger(__name__)


def batches(inputs: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]


def collect_stats(
    adapter: ModelAdapter,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Per layer × segment XᵀX sums and channel maxima over full sampling runs of `inputs`.

    Batch i samples from seed + i, so results do not depend on how many batches ran before a resume
    nor on how many processes share the work (see calibrate/distributed.py).
    """
    if not inputs:
        raise CalibrationError("the calibration set is empty; give at least one prompt/label (--calib FILE)")
    capture = StatsCapture(layers, segments.count)
    handle = install_segment_hook(adapter, segments, capture.set_position)
    try:
        with capture, torch.no_grad():
            mine = shard(batches(inputs, batch_size))
            for i, chunk in tqdm(mine, desc="calibrating", unit="batch", disable=not progress):
                adapter.generate(chunk, seed=seed + i, num_steps=len(segments.timesteps))
    finally:
        handle.remove()
    for stats in capture.stats.values():
        reduce_(stats.xtx)
        reduce_(stats.tokens)
        reduce_(stats.absmax, op="max")
    capture.check_filled()
    log.info(
        "calibrated %d layers on %d inputs × %d steps", len(layers), len(inputs), len(segments.timesteps)
    )
    return capture.stats
