"""Calibration in passes: record the sampler once, then capture + solve the schedule's groups of layers.

The pass schedule is `engine.schedule.schedule_for`, the very one `adatsq estimate` prints: accumulators
(one float32 XᵀX per distinct input and segment) grouped so that each pass fits the memory budget, split
into one share per owner rank. A rank replays the recorded denoiser calls for its shares only, with
hooks on their layers, stopping right after the last layer whose input they need; the caller solves
them and drops the statistics before the next share is captured (AdaTSQ iterates the shares twice:
candidates + error table, then the plan's final solves; `engine.shares` keeps solved shares on disk so
a killed run resumes after its last one). The float layers stay in place until every pass has run, so
each statistic is the same sum of the same terms in the same order whatever the budget and the number
of processes: the checkpoint does not depend on either.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from adatsq.calibrate.capture import LayerStats, StatsCapture
from adatsq.calibrate.distributed import world
from adatsq.calibrate.record import Recording, record_calls, replay
from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap
from adatsq.core.sizes import format_size
from adatsq.engine.schedule import Schedule, Share, schedule_for
from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter

log = logging.getLogger(__name__)


def pass_schedule(
    adapter: ModelAdapter, layers: dict[str, nn.Linear], segments: int, budget: int | None
) -> Schedule:
    """The schedule for this run: checked against the budget before any work, one share per process.

    The budget is the device's, as `adatsq estimate` counts it: the denoiser's weights (they stay for the
    replays) are reserved first, then accumulators and solves fill the rest.
    """
    denoiser = adapter.denoiser()
    weights = sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()])
    return schedule_for(denoiser, list(layers), segments, budget, reserved_bytes=weights, devices=world()[1])


def stop_point(share: Share, recording: Recording) -> tuple[str, int] | None:
    """Where a replay for `share` may stop each call: after the first run of each accumulator's first
    reader, or the last run of a layer with an input of its own (DiT runs block 0's timestep embedder
    again for its output layer, so that replay goes on to the end)."""
    position = {name: i for i, name in enumerate(recording.linear_order)}
    missing = [n for n in share.layers if n not in position]
    if missing:
        raise CalibrationError(
            f"{len(missing)} layer(s) never ran during calibration (e.g. {missing[0]!r}); "
            "they are not on the sampling path: add them to the recipe's ignore list"
        )
    needs = {min(a.layers, key=position.__getitem__): len(a.layers) == 1 for a in share.accumulators}
    return recording.stop_point(needs)


def capture_share(
    adapter: ModelAdapter,
    recording: Recording,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    stop: tuple[str, int] | None,
    progress: bool,
) -> dict[str, LayerStats]:
    """Statistics of `layers` from one replay of the recording, each call stopped at `stop` (layer, run)."""
    capture = StatsCapture(layers, segments.count)
    with capture:
        replay(
            adapter.denoiser(),
            recording,
            lambda call: capture.set_position(call.segment, call.step),
            stop_after=None if stop is None else layers[stop[0]],
            runs=1 if stop is None else stop[1],
            progress=progress,
        )
    return capture.finish(summed_over_ranks=False)


class ReplayedPasses:
    """This rank's shares of the schedule over one recording; every iteration replays them anew.

    AdaTSQ iterates twice (candidates + error table, then the plan's final solves) at the cost of one
    more replay instead of holding every statistic between the two. The sampler is recorded on the
    first capture, so a resumed run whose shares are all solved never samples again.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        layers: dict[str, nn.Linear],
        segments: SegmentMap,
        schedule: Schedule,
        record: Callable[[], Recording],
        progress: bool,
        key: Callable[[], str],
    ) -> None:
        self.adapter, self.layers, self.segments = adapter, layers, segments
        self.schedule, self.progress, self._key = schedule, progress, key
        self._record, self._recording = record, None
        rank = world()[0]
        self.shares = [s for p in schedule.passes for s in p.shares if s.rank == rank]

    @functools.cached_property
    def key(self) -> str:
        """What the statistics depend on, digested only when a resumable store asks (it reads every
        weight once)."""
        return self._key()

    @property
    def recording(self) -> Recording:
        if self._recording is None:
            self._recording = self._record()
        return self._recording

    def capture(self, index: int) -> dict[str, LayerStats]:
        """Statistics of share `index` from one replay (the caller frees them by dropping the dict)."""
        share = self.shares[index]
        log.info(
            "share %d/%d of rank %d: %d layers, %s",
            index + 1,
            len(self.shares),
            world()[0],
            len(share.layers),
            format_size(share.peak_device_bytes),
        )
        stop = stop_point(share, self.recording)
        layers = {n: self.layers[n] for n in share.layers}
        return capture_share(self.adapter, self.recording, layers, self.segments, stop, self.progress)

    def __iter__(self) -> Iterator[dict[str, LayerStats]]:
        return (self.capture(index) for index in range(len(self.shares)))


def calibration_passes(
    adapter: ModelAdapter,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    budget: int | None,
    progress: bool,
) -> ReplayedPasses:
    """Check the schedule against the budget now; record once, when the first share is captured."""
    schedule = pass_schedule(adapter, layers, segments.count, budget)

    def record() -> Recording:
        recording = record_calls(
            adapter, segments, inputs, batch_size=batch_size, seed=seed, progress=progress
        )
        log.info(
            "calibration in %d pass(es)%s on %d process(es); recorded %d denoiser calls (%s on the host)",
            len(schedule.passes),
            "" if budget is None else f" under {format_size(budget)}",
            world()[1],
            len(recording.calls),
            format_size(recording.nbytes()),
        )
        return recording

    def key() -> str:
        return _passes_key(layers, segments, inputs, batch_size, seed, budget)

    return ReplayedPasses(adapter, layers, segments, schedule, record, progress, key=key)


def _passes_key(
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    batch_size: int,
    seed: int,
    budget: int | None,
) -> str:
    """A digest of what the passes' statistics depend on (weights by a float64 sum per layer)."""
    text = repr(
        (
            [(n, tuple(m.weight.shape), float(m.weight.detach().double().sum())) for n, m in layers.items()],
            segments.step_ranges,
            segments.timesteps,
            [repr(x) for x in inputs],
            batch_size,
            seed,
            budget,
            world(),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def layer_statistics(
    adapter: ModelAdapter,
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    budget: int | None,
    progress: bool,
    resume: Path | None = None,
) -> Iterable[dict[str, LayerStats]]:
    """The statistics of `layers`, group by group, as often as they are iterated.

    Unbounded in one process: one live calibration run, held (and resumable). Under a budget or with
    several processes: record / replay passes, each group freed once the caller drops it.
    """
    if budget is None and world()[1] == 1:
        held = collect_stats(
            adapter, layers, segments, inputs, batch_size=batch_size, seed=seed, progress=progress,
            resume=resume,
        )  # fmt: skip
        return [held]
    return calibration_passes(
        adapter, layers, segments, inputs, batch_size=batch_size, seed=seed, budget=budget, progress=progress
    )
