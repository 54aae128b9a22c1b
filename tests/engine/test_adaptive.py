"""engine/adaptive.py on a tiny random reference-architecture DiT: table, search, switching, plan files."""

import dataclasses

import pytest
import torch

import adatsq
import adatsq.checkpoint.load
import adatsq.engine.adaptive
from adatsq.engine.planner import Planner
from adatsq.errors import PlanError
from adatsq.plan.schema import Budget, load_plan, save_plan
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.recipe import recipe_from_dict

RECIPE = {
    "method": "adatsq",
    "weight": {"bits": 4, "group_size": 32, "symmetric": False},
    "activation": {"bits": 8},
    "calibration": {"samples": 4, "steps": 4, "batch_size": 4, "segments": 2},
    "planner": {"candidates": [3, 4, 8], "fisher_samples": 2, "measure_samples": 2, "beam_width": 2},
}


@pytest.fixture(scope="module")
def planner(tiny_adapter):
    return Planner.prepare(tiny_adapter(), recipe_from_dict(RECIPE), progress=False)


def test_search_respects_budget_and_measures(planner):
    result = planner.search(Budget("avg_bits", 4.0))
    assert result.metrics["avg_bits"] <= 4.0 + 1e-9
    assert result.measure_calls > 0 and result.metrics["measured_error"] > 0
    assert planner.problem.error_table.shape == (len(planner.calibration.layers), 2, 3)
    assert result.plan.fisher_method == planner.calibration.fisher_method == "gradient"  # reference DiT


def test_infeasible_budget_names_the_minimum(planner):
    with pytest.raises(PlanError, match="minimum reachable value is 3"):
        planner.search(Budget("avg_bits", 2.5))


def test_plan_file_round_trip_and_quantize_switches_per_segment(planner, tmp_path, tiny_adapter):
    plan = planner.search(Budget("avg_bits", 5.0)).plan
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan
    qmodel = adatsq.quantize(tiny_adapter(), recipe_from_dict(RECIPE), plan=path, progress=False)
    switching = [m for m in qmodel.adapter.denoiser().modules() if isinstance(m, TimestepQuantLinear)]
    expected = [name for name, row in plan.layers.items() if len(set(row)) > 1]
    assert len(switching) == len(expected) > 0
    # during sampling each call runs the variant its segment's plan entry names
    layer = switching[0]
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.active_bits))
    qmodel.adapter.generate([3], seed=0, num_steps=4)
    per_step = len(seen) // 4  # DiT reuses block 0's timestep embedder for its output modulation
    assert seen == [layer.segment_bits[0]] * 2 * per_step + [layer.segment_bits[1]] * 2 * per_step
    qmodel.save(tmp_path / "ckpt")
    assert load_plan(tmp_path / "ckpt" / "plan.json") == plan


def test_plan_for_another_model_names_the_layers_before_calibrating(planner, tiny_adapter, monkeypatch):
    plan = planner.search(Budget("avg_bits", 4.0)).plan

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before checking the plan")

    monkeypatch.setattr(adatsq.engine.adaptive, "calibrate", no_calibration)
    with pytest.raises(PlanError, match=r"transformer_blocks\.1\."):
        adatsq.quantize(tiny_adapter(layers=2), recipe_from_dict(RECIPE), plan=plan, progress=False)


def test_plan_with_other_segment_boundaries_is_refused(planner, tiny_adapter):
    plan = planner.search(Budget("avg_bits", 4.0)).plan
    moved = dataclasses.replace(plan, segments=((0, 1), (1, 4)))  # same count, other boundaries
    with pytest.raises(PlanError, match="not the recipe's calibration segments"):
        adatsq.quantize(tiny_adapter(), recipe_from_dict(RECIPE), plan=moved, progress=False)


def test_plan_with_other_segments_than_the_recipe(planner, tiny_adapter):
    plan = planner.search(Budget("avg_bits", 4.0)).plan
    recipe = recipe_from_dict(RECIPE)
    other = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, steps=6))
    with pytest.raises(PlanError, match="made for 4 sampler steps in 2 segments"):
        adatsq.quantize(tiny_adapter(), other, plan=plan, progress=False)


def test_outlier_transforms_survive_save_and_load(tmp_path, tiny_adapter):
    recipe = recipe_from_dict(
        {
            **RECIPE,
            "method": "gptq",
            "activation": {"bits": 4},
            "outliers": {"smooth_alpha": 0.5, "rotate": True, "lowrank_rank": 4},
        }
    )
    qmodel = adatsq.quantize(tiny_adapter(), recipe, progress=False)
    layer = next(m for m in qmodel.adapter.denoiser().modules() if isinstance(m, QuantLinear))
    assert layer.smooth is not None and layer.rotation_signs is not None and layer.lowrank_a.shape[0] == 4
    qmodel.save(tmp_path / "ckpt")
    loaded = adatsq.checkpoint.load.load_checkpoint(tmp_path / "ckpt")[0]
    before = qmodel.adapter.generate([5, 6], seed=1, num_steps=4)
    torch.testing.assert_close(loaded.generate([5, 6], seed=1, num_steps=4), before)


def test_search_after_quantize_keeps_the_quantized_layers(planner):
    qmodel = planner.quantize(planner.search(Budget("avg_bits", 4.0)).plan)
    planner.search(Budget("avg_bits", 5.0))
    assert not any(
        type(m) is torch.nn.Linear for n, m in qmodel.adapter.denoiser().named_modules() if n in qmodel.layers
    )


def test_search_costs_no_more_denoiser_runs_than_estimate_predicts(planner):
    """Counted denoiser calls of a real beam search against estimate's restart formula."""
    from adatsq.engine.estimate import search_runs

    meter, config = planner.meter, planner.config()
    denoiser = planner.calibration.adapter.denoiser()
    counted = []
    handle = denoiser.register_forward_pre_hook(lambda module, args: counted.append(1))
    try:
        for i, batch in enumerate(meter.batches):  # one full run of the measure inputs
            planner.calibration.adapter.generate(batch, seed=meter.seed + i, num_steps=meter.num_steps)
    finally:
        handle.remove()
    before = meter.denoiser_calls
    result = planner.search(Budget("avg_bits", 4.5))
    spent = meter.denoiser_calls - before
    segments = planner.problem.num_segments
    predicted = search_runs(config.beam_width, config.proposals_per_stage, segments) * len(counted)
    assert result.measure_calls > segments  # a real search, several trajectories per stage
    assert 0 < spent <= predicted, (spent, predicted)
