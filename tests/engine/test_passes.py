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
from adatsq.engine.passes import accumulator_bytes, plan_passes, solve_bytes
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


def toy_layers(widths):
    return {f"l{i}": nn.Linear(w, 8) for i, w in enumerate(widths)}


def test_passes_cover_every_layer_once_in_order_and_grow_as_the_budget_shrinks():
    layers = toy_layers([16, 32, 64, 32, 16, 64])
    order = ["l5", "l0", "l1", "l2", "l3", "l4"]  # execution order, not registration order
    counts = []
    widest = accumulator_bytes(layers["l5"], 2) + solve_bytes(layers["l5"])
    for budget in (None, 10**7, 3 * widest, widest):
        passes = plan_passes(layers, order, segments=2, budget=budget)
        assert [n for p in passes for n in p.layers] == order
        if budget is not None:
            assert all(p.bytes <= budget for p in passes)
        counts.append(len(passes))
    assert counts[0] == 1 and counts == sorted(counts) and counts[-1] > counts[1]


def test_a_budget_below_one_layer_names_it_and_the_feasible_minimum():
    layers = toy_layers([16, 64])
    need = accumulator_bytes(layers["l1"], 2) + solve_bytes(layers["l1"])
    with pytest.raises(
        ConfigError, match=rf"layer 'l1' alone needs.*smallest feasible budget is {need} bytes"
    ):
        plan_passes(layers, ["l0", "l1"], segments=2, budget=need - 1)
    assert len(plan_passes(layers, ["l0", "l1"], segments=2, budget=need)) == 2


def test_replayed_statistics_equal_the_live_ones_exactly(recipe):
    adapter = adapter_for("reference")
    layers = select_layers(adapter, recipe)
    cal = recipe.calibration
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), cal.segments)
    inputs = adapter.default_inputs(cal.samples, cal.seed)
    live = collect_stats(adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=0, progress=False)
    recording = record_calls(adapter, segments, inputs, batch_size=cal.batch_size, seed=0, progress=False)
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


def test_checkpoints_are_identical_under_any_budget(recipe):
    layers = select_layers(adapter_for("reference"), recipe)
    counts = [len(plan_passes(layers, list(layers), 2, parse_size(b))) for b in ("20MiB", "48MiB")]
    assert counts[0] > counts[1] > 1  # both budgets really split the calibration
    live = tensor_digest(adatsq.quantize("reference", recipe, progress=False))
    for budget in ("20MiB", "48MiB"):
        bounded = replace(recipe, calibration=replace(recipe.calibration, max_memory=budget))
        assert tensor_digest(adatsq.quantize("reference", bounded, progress=False)) == live, budget


def test_planning_refuses_a_budget_instead_of_ignoring_it(recipe):
    r = adatsq.load_recipe("recipes/reference/adatsq-w4a8.yaml")
    r = replace(r, calibration=replace(r.calibration, max_memory="1GiB"))
    with pytest.raises(ConfigError, match="max_memory"):
        adatsq.quantize("reference", r, progress=False)
