"""Interrupted calibration continues from its progress file and gives the same sums as one run."""

import pytest
import torch

from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import DigitsPipeline, build_scheduler, build_transformer


class Interrupt(Exception):
    pass


def setup():
    torch.manual_seed(0)
    adapter = ReferenceAdapter(DigitsPipeline(build_transformer({"num_layers": 1}).eval(), build_scheduler()))
    layers = {n: m for n, m in adapter.denoiser().named_modules() if isinstance(m, torch.nn.Linear)}
    return adapter, layers, SegmentMap.from_schedule(adapter.step_timesteps(4), 2)


def test_resume_after_interruption_matches_one_run(tmp_path):
    adapter, layers, segments = setup()
    inputs, resume = list(range(8)), tmp_path / "progress.safetensors"
    full = collect_stats(adapter, layers, segments, inputs, batch_size=2, seed=0, progress=False)

    calls = []
    original = adapter.generate

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return original(*args, **kwargs)

    adapter.generate = flaky
    with pytest.raises(Interrupt):
        collect_stats(adapter, layers, segments, inputs, batch_size=2, seed=0, progress=False,
                      resume=resume, save_every=0.0)  # fmt: skip
    assert resume.is_file()
    adapter.generate = original
    ran = []
    adapter.generate = lambda *a, **k: (ran.append(1), original(*a, **k))[1]
    resumed = collect_stats(
        adapter, layers, segments, inputs, batch_size=2, seed=0, progress=False, resume=resume
    )
    assert len(ran) == 2  # 2 of 4 batches were saved before the interruption
    for name in full:
        assert torch.equal(resumed[name].tokens, full[name].tokens)
        torch.testing.assert_close(resumed[name].xtx, full[name].xtx)


def test_progress_for_other_settings_is_ignored(tmp_path):
    adapter, layers, segments = setup()
    resume = tmp_path / "progress.safetensors"
    collect_stats(adapter, layers, segments, [1, 2], batch_size=1, seed=0, progress=False, resume=resume,
                  save_every=0.0)  # fmt: skip
    other = collect_stats(
        adapter, layers, segments, [3, 4], batch_size=1, seed=0, progress=False, resume=resume
    )
    fresh = collect_stats(adapter, layers, segments, [3, 4], batch_size=1, seed=0, progress=False)
    name = next(iter(fresh))
    torch.testing.assert_close(other[name].xtx, fresh[name].xtx)


def test_a_finished_calibration_is_not_redone(tmp_path):
    """Progress is saved once every batch ran: a run that fails later resumes with nothing to redo."""
    adapter, layers, segments = setup()
    inputs, resume = list(range(8)), tmp_path / "progress.safetensors"
    full = collect_stats(adapter, layers, segments, inputs, batch_size=2, seed=0, progress=False,
                         resume=resume, save_every=1e9)  # fmt: skip
    original, ran = adapter.generate, []
    adapter.generate = lambda *a, **k: (ran.append(1), original(*a, **k))[1]
    resumed = collect_stats(
        adapter, layers, segments, inputs, batch_size=2, seed=0, progress=False, resume=resume
    )
    assert ran == []
    for name in full:
        assert torch.equal(resumed[name].tokens, full[name].tokens)
        assert torch.equal(resumed[name].xtx, full[name].xtx)
