import pytest
import torch

from adatsq.calibrate.segments import SegmentMap, install_segment_hook, split_steps
from adatsq.errors import PlanError


def test_split_steps_is_contiguous_and_balanced():
    assert split_steps(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_steps(5, 1) == [(0, 5)]
    with pytest.raises(PlanError, match="cannot split 3 sampler steps into 4"):
        split_steps(3, 4)


def test_segment_of_places_other_schedules_by_value():
    timesteps = [1000.0 - 100 * i for i in range(10)]  # 1000 .. 100
    segments = SegmentMap.from_schedule(timesteps, 2)
    assert [segments.segment_of(t) for t in timesteps] == [0] * 5 + [1] * 5
    assert segments.segment_of(640.0) == 0 and segments.segment_of(540.0) == 1  # another step count
    assert segments.intervals() == [(1000.0, 600.0), (500.0, 100.0)]


def test_segments_must_cover_the_schedule():
    with pytest.raises(PlanError, match="sampler runs 4"):
        SegmentMap(((0, 2), (2, 3)), (4.0, 3.0, 2.0, 1.0))


class _Denoiser(torch.nn.Module):
    def forward(self, x, timestep):
        return x * timestep


class _Adapter:
    def __init__(self):
        self.net = _Denoiser()

    def denoiser(self):
        return self.net

    def timestep_of(self, args, kwargs):
        return float(kwargs["timestep"])


def test_hook_reports_segment_and_step_once_per_call():
    adapter = _Adapter()
    segments = SegmentMap.from_schedule([3.0, 2.0, 1.0, 0.5], 2)
    seen = []
    handle = install_segment_hook(adapter, segments, lambda s, step: seen.append((s, step)))
    for t in (3.0, 2.0, 1.0, 0.5):
        adapter.net(torch.ones(1), timestep=t)
    handle.remove()
    adapter.net(torch.ones(1), timestep=3.0)
    assert seen == [(0, 0), (0, 1), (1, 2), (1, 3)]
