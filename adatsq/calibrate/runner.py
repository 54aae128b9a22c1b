"""Run the model's own sampler over calibration inputs while StatsCapture listens."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats, StatsCapture
from adatsq.calibrate.distributed import shard, world
from adatsq.calibrate.record import batches
from adatsq.calibrate.resume import load_progress, progress_key, save_progress
from adatsq.calibrate.segments import SegmentMap, install_segment_hook
from adatsq.core.progress import tqdm_disable
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter

log = logging.getLogger(__name__)


def collect_stats(
    adapter: ModelAdapter,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    progress: bool = True,
    resume: Path | None = None,
    save_every: float = 60.0,
) -> dict[str, LayerStats]:
    """Per layer × segment XᵀX sums and channel maxima over full sampling runs of `inputs`.

    Batch i samples from seed + i, so results do not depend on how many batches ran before a resume
    nor on how many processes share the work (see calibrate/distributed.py). With `resume`, partial
    sums are saved there every `save_every` seconds and once all batches ran (a run that fails after
    calibration resumes with none to redo); a matching file is continued from.
    """
    if not inputs:
        raise CalibrationError("the calibration set is empty; give at least one prompt/label (--calib FILE)")
    capture = StatsCapture(layers, segments.count)
    rank, size = world()
    if resume is not None and size > 1:
        resume = resume.with_name(f"{resume.name}.rank{rank}")
    key = progress_key(layers, segments, inputs, batch_size, seed, rank)
    done = load_progress(resume, capture.stats, key) if resume is not None else 0
    mine = shard(batches(inputs, batch_size))
    handle = install_segment_hook(adapter, segments, capture.set_position)
    last_save, saved = time.monotonic(), done
    try:
        with capture, torch.no_grad():
            bar = tqdm(
                mine[done:],
                desc="calibrating",
                unit="batch",
                disable=tqdm_disable(progress),
                initial=done,
                total=len(mine),
            )
            for count, (i, chunk) in enumerate(bar, start=done):
                adapter.generate(chunk, seed=seed + i, num_steps=len(segments.timesteps))
                if resume is not None and time.monotonic() - last_save > save_every:
                    save_progress(resume, capture.stats, count + 1, key)
                    last_save, saved = time.monotonic(), count + 1
        if resume is not None and saved < len(mine):
            save_progress(resume, capture.stats, len(mine), key)
    finally:
        handle.remove()
    stats = capture.finish(summed_over_ranks=True)
    log.info(
        "calibrated %d layers on %d inputs × %d steps", len(layers), len(inputs), len(segments.timesteps)
    )
    return stats
