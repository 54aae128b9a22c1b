"""Timestep segments: which contiguous group of denoising steps a denoiser call belongs to.

Segments are defined on the calibration schedule's step indices and stored as timestep intervals, so a
call is placed by its timestep *value*: sampling with another step count still finds the right segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from adatsq.errors import PlanError
from adatsq.models.base import ModelAdapter
from adatsq.quant.linear import TimestepQuantLinear


def split_steps(num_steps: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous [start, end) step ranges, as equal as possible (earlier ones one longer)."""
    if not 1 <= groups <= num_steps:
        raise PlanError(f"cannot split {num_steps} sampler steps into {groups} segments; use 1..{num_steps}")
    base, extra = divmod(num_steps, groups)
    ranges, start = [], 0
    for g in range(groups):
        end = start + base + (1 if g < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class SegmentMap:
    """Step ranges of each segment plus the timestep values that separate them."""

    step_ranges: tuple[tuple[int, int], ...]  # [start, end) sampler step indices per segment
    timesteps: tuple[float, ...]  # the schedule's timestep value at every step

    def __post_init__(self) -> None:
        if self.step_ranges[-1][1] != len(self.timesteps):
            raise PlanError(
                f"segments cover {self.step_ranges[-1][1]} steps but the sampler runs {len(self.timesteps)}; "
                "make the plan for the same number of steps"
            )
        for (_, end), (start, _) in zip(self.step_ranges, self.step_ranges[1:], strict=False):
            if end != start:
                raise PlanError(f"segments {list(self.step_ranges)} are not contiguous")

    @classmethod
    def from_schedule(cls, timesteps: Sequence[float], groups: int) -> SegmentMap:
        return cls(tuple(split_steps(len(timesteps), groups)), tuple(float(t) for t in timesteps))

    @property
    def count(self) -> int:
        return len(self.step_ranges)

    def intervals(self) -> list[tuple[float, float]]:
        """(first, last) timestep value of each segment: what checkpoints store."""
        return [(self.timesteps[s], self.timesteps[e - 1]) for s, e in self.step_ranges]

    def step_of(self, t: float) -> int:
        """Index of the schedule step whose timestep is nearest to `t`."""
        return min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - t))

    def segment_of(self, t: float) -> int:
        """Segment of a timestep value; values between segments go to the nearer boundary step."""
        step = self.step_of(t)
        return next(g for g, (start, end) in enumerate(self.step_ranges) if start <= step < end)


def install_segment_hook(
    adapter: ModelAdapter, segments: SegmentMap, on_call: Callable[[int, int], None]
) -> RemovableHandle:
    """Forward pre-hook on the denoiser calling `on_call(segment, step)` once per denoiser call.

    This is the only per-step cost of timestep-dependent behaviour: layers never look at the timestep.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = adapter.timestep_of(args, kwargs)
        step = segments.step_of(t)
        on_call(segments.segment_of(t), step)

    return adapter.denoiser().register_forward_pre_hook(hook, with_kwargs=True)


def attach_segment_switching(adapter: ModelAdapter, segments: SegmentMap) -> None:
    """One pre-hook on the denoiser points every switching layer at the current segment's variant."""
    switching = [m for m in adapter.denoiser().modules() if isinstance(m, TimestepQuantLinear)]
    if not switching:
        return
    current = [-1]

    def on_call(segment: int, step: int) -> None:
        if segment != current[0]:
            for layer in switching:
                layer.set_segment(segment)
            current[0] = segment

    install_segment_hook(adapter, segments, on_call)
