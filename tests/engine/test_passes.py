"""Memory-bounded calibration: record once, replay groups of layers; the result ignores the budget."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
from torch import nn

import adatsq
from adatsq.calibrate.capture import StatsCapture
from adatsq.calibrate.record import record_calls, replay
from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap
from adatsq.checkpoint.save import checkpoint_tensors
from adatsq.core.sizes import parse_size
from adatsq.engine.passes import capture_share, pass_schedule
from adatsq.engine.surgery import select_layers
from adatsq.errors import ConfigError
from adatsq.models.resolve import adapter_for


@pytest.fixture(scope="module")
def recipe():
    r = adatsq.load_recipe("recipes/reference/gptq-w4a8.yaml")
    return replace(r, calibration=replace(r.calibration, samples=6, steps=4, batch_size=3, segments=2))


def tensor_digest(qmodel) -> str:
    tensors = checkpoint_tensors(qmodel)
    return hashlib.sha256(
        b"".join(k.encode() + tensors[k].numpy().tobytes() for k in sorted(tensors))
    ).hexdigest()


@pytest.mark.parametrize(
    "text, expected", [("123456", 123456), ("768MiB", 768 * 2**20), ("40GiB", 40 * 2**30), ("1.5GB", 1.5e9)]
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "40 gigs", "-3GiB", "1e9"])
def test_malformed_sizes_name_the_format(text):
    with pytest.raises(ConfigError, match="768MiB"):
        parse_size(text)


@pytest.fixture(scope="module")
def sampled(recipe):
    """The reference calibration sampled twice: live statistics, and a recording of the same calls."""
    adapter = adapter_for("reference")
    layers = select_layers(adapter, recipe)
    cal = recipe.calibration
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), cal.segments)
    inputs = adapter.default_inputs(cal.samples, cal.seed)
    live = collect_stats(adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=0, progress=False)
    recording = record_calls(adapter, segments, inputs, batch_size=cal.batch_size, seed=0, progress=False)
    return adapter, layers, segments, live, recording


def test_replayed_statistics_equal_the_live_ones_exactly(recipe, sampled):
    adapter, layers, segments, live, recording = sampled
    cal = recipe.calibration
    assert len(recording.calls) == 2 * cal.steps  # two batches, one (CFG-batched) call per step
    assert set(recording.linear_order) == {
        n for n, m in adapter.denoiser().named_modules() if isinstance(m, nn.Linear)
    }
    capture = StatsCapture(layers, segments.count)
    with capture:
        replay(
            adapter.denoiser(), recording, lambda c: capture.set_position(c.segment, c.step), progress=False
        )
    for name in layers:
        assert torch.equal(capture.stats[name].xtx, live[name].xtx), name
        assert torch.equal(capture.stats[name].tokens, live[name].tokens), name


def test_a_replay_stopped_early_still_sees_every_run_of_a_reused_layer(sampled):
    """DiT runs block 0's timestep embedder twice per call (its block, then the output layer): a replay
    for that layer alone must not stop after the first run, or it counts half the tokens."""
    adapter, layers, segments, live, recording = sampled
    reused = [n for n in layers if recording.first_call.count(n) > 1]
    assert "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" in reused
    for name in [*reused, recording.first_call[0]]:
        stop = recording.stop_point({name: True})
        assert stop == (recording.first_call[max(i for i, n in enumerate(recording.first_call) if n == name)],
                        recording.first_call.count(stop[0]))  # fmt: skip
        stats = capture_share(adapter, recording, {name: layers[name]}, segments, stop, progress=False)
        assert torch.equal(stats[name].tokens, live[name].tokens), name
        assert torch.equal(stats[name].xtx, live[name].xtx), name


def splitting_budgets(recipe) -> list[str]:
    """Two feasible budgets (bytes) splitting the reference calibration into different pass counts."""
    adapter = adapter_for("reference")
    layers = select_layers(adapter, recipe)
    whole = pass_schedule(adapter, layers, 2, None).peak_device_bytes  # everything in one pass
    by_count: dict[int, str] = {}
    for fraction in (0.5, 0.6, 0.7, 0.8, 0.9):
        budget = str(int(whole * fraction))
        try:
            by_count.setdefault(len(pass_schedule(adapter, layers, 2, parse_size(budget)).passes), budget)
        except ConfigError:  # below the largest layer's own need
            continue
    return [by_count[n] for n in sorted(by_count, reverse=True) if n > 1][:2]


def test_checkpoints_are_identical_under_any_budget(recipe):
    budgets = splitting_budgets(recipe)
    assert len(budgets) == 2  # two budgets that really split the calibration, differently
    live = tensor_digest(adatsq.quantize("reference", recipe, progress=False))
    for budget in budgets:
        bounded = replace(recipe, calibration=replace(recipe.calibration, max_memory=budget))
        assert tensor_digest(adatsq.quantize("reference", bounded, progress=False)) == live, budget


@pytest.fixture(scope="module")
def adaptive(recipe):
    """AdaTSQ with the same calibration; a small search."""
    r = adatsq.load_recipe("recipes/reference/adatsq-w4a8.yaml")
    planner = replace(r.planner, fisher_samples=3, measure_samples=2, beam_width=2, proposals_per_stage=3)
    return replace(r, calibration=recipe.calibration, planner=planner)


def test_adatsq_plans_and_quantizes_the_same_under_a_budget(adaptive):
    """Candidates and error table from one replay of the passes, final solves from another: same bytes."""
    live = adatsq.quantize("reference", adaptive, progress=False)
    budget = splitting_budgets(adaptive)[0]
    bounded = replace(adaptive, calibration=replace(adaptive.calibration, max_memory=budget))
    split = adatsq.quantize("reference", bounded, progress=False)
    assert split.plan.layers == live.plan.layers
    assert len(set(live.plan.layers[n] for n in live.plan.layers)) > 1  # a real mixed plan
    assert tensor_digest(split) == tensor_digest(live)


def _quantize_in_process(rank: int, init: str, recipe, out: str, world_size: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        qmodel = adatsq.quantize("reference", recipe, progress=False)
        if rank == 0:
            qmodel.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, budget", [("gptq", None), ("gptq", "split"), ("adatsq", None)])
def test_two_processes_write_the_single_process_checkpoint_byte_for_byte(
    recipe, adaptive, tmp_path, method, budget
):
    """Owner ranks replay and solve their own shares (AdaTSQ: candidates too, then every rank searches
    the same gathered problem): same sums, same order, same bytes."""
    import torch.multiprocessing as mp

    recipe = adaptive if method == "adatsq" else recipe
    if budget is not None:
        budget = splitting_budgets(recipe)[0]
        recipe = replace(recipe, calibration=replace(recipe.calibration, max_memory=budget))
    adatsq.quantize("reference", recipe, progress=False).save(tmp_path / "one")
    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_quantize_in_process, args=(init, recipe, str(tmp_path / "two"), 2), nprocs=2, join=True)
    config = "transformer/config.json"  # format 2: the reference DiT's component
    assert (tmp_path / "two" / config).read_bytes() == (tmp_path / "one" / config).read_bytes()
    one, two = (tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()  # header included: byte for byte


class Killed(Exception):
    """Stands for the process dying in the middle of a share."""


@pytest.mark.parametrize("method", ["gptq", "adatsq"])
def test_a_killed_budgeted_run_resumes_after_its_last_solved_share(recipe, adaptive, tmp_path, method):
    from adatsq.engine.passes import ReplayedPasses
    from adatsq.engine.shares import clear_shares

    base = adaptive if method == "adatsq" else recipe
    bounded = replace(base, calibration=replace(base.calibration, max_memory=splitting_budgets(base)[0]))
    whole = tensor_digest(adatsq.quantize("reference", bounded, progress=False))
    resume = tmp_path / ".out.calibration.safetensors"
    real, captured = ReplayedPasses.capture, []

    def dies_in_share_1(self, index):
        if index == 1:
            raise Killed
        captured.append(index)
        return real(self, index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReplayedPasses, "capture", dies_in_share_1)
        with pytest.raises(Killed):
            adatsq.quantize("reference", bounded, progress=False, resume=resume)
    assert captured == [0] and len(list(tmp_path.glob("*.share-*"))) == 1  # share 0 solved and kept

    def counted(self, index):
        captured.append(index)
        return real(self, index)

    captured.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReplayedPasses, "capture", counted)
        resumed = adatsq.quantize("reference", bounded, progress=False, resume=resume)
    shares = len(list(tmp_path.glob("*.share-*")))
    assert captured[0] == 1  # share 0 was read back, not replayed
    assert tensor_digest(resumed) == whole
    clear_shares(resume)
    assert not list(tmp_path.glob("*.share-*")) and shares >= 2
