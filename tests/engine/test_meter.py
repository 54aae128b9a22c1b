"""engine/meter.py: TrajectoryMeter runs real quantized layers along the sampler, then restores the model."""

from dataclasses import replace

import pytest
import torch

from adatsq.engine.calibration import calibrate
from adatsq.engine.meter import TrajectoryMeter
from adatsq.engine.planner import solve_candidates
from adatsq.engine.solve import Variant
from adatsq.plan.schema import PartialPlan
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import WeightScheme
from adatsq.quant.transforms import InputTransform

INPUTS, SEED = [1, 7], 11


@pytest.fixture(scope="module")
def setup(tiny_adapter, make_recipe):
    recipe = make_recipe("adatsq", segments=2, planner={"fisher": False, "candidates": [3, 8]})
    calibration = calibrate(tiny_adapter(), recipe, progress=False)
    variants = solve_candidates(calibration, recipe, (3, 8), progress=False).variants
    return calibration, recipe, TrajectoryMeter(calibration, variants, recipe, INPUTS, SEED)


def partial(calibration, row):
    return PartialPlan(
        bits={name: row for name in calibration.layers},
        act_bits=8,
        segments=tuple(calibration.segments.step_ranges),
    )


def test_more_bits_measure_less_error(setup):
    calibration, _, meter = setup
    for row8, row3 in (((8,), (3,)), ((8, 8), (3, 3))):
        e8, e3 = meter(partial(calibration, row8)), meter(partial(calibration, row3))
        assert 0 < e8 < 0.1 * e3, (row8, e8, e3)
    # 3 bits only in the second segment: less error than 3 bits throughout, more than 8 bits throughout
    mixed = meter(partial(calibration, (8, 3)))
    assert meter(partial(calibration, (8, 8))) < mixed < meter(partial(calibration, (3, 3)))


def test_measuring_restores_the_model(setup):
    calibration, _, meter = setup
    denoiser = calibration.adapter.denoiser()
    modules = {name: denoiser.get_submodule(name) for name in calibration.layers}
    before = calibration.adapter.generate(INPUTS, seed=SEED, num_steps=4)
    calls = meter.calls
    meter(partial(calibration, (3, 3)))
    assert meter.calls == calls + 1
    assert all(denoiser.get_submodule(name) is module for name, module in modules.items())
    torch.testing.assert_close(calibration.adapter.generate(INPUTS, seed=SEED, num_steps=4), before)


def test_variants_that_reproduce_the_float_weights_measure_zero_error(tiny_adapter, make_recipe):
    # put every float weight on its own 8-bit grid first: the 8-bit variant then IS the float layer
    # (activations in float), so any nonzero error would come from the meter itself (noise, seed, steps)
    recipe = make_recipe("adatsq", act=None, segments=2, planner={"fisher": False, "candidates": [8]})
    calibration = calibrate(tiny_adapter(seed=3), recipe, progress=False)
    variants = {}
    for name, linear in calibration.layers.items():
        qw = rtn(linear.weight.detach(), WeightScheme(8, 32, False))
        with torch.no_grad():
            linear.weight.copy_(qw.dequantize())
        variants[name] = {8: Variant(qw, InputTransform(), {})}
    first = next(iter(calibration.layers))
    coarse = rtn(calibration.layers[first].weight.detach(), WeightScheme(2, 32, False))
    variants[first][2] = Variant(coarse, InputTransform(), {})
    meter = TrajectoryMeter(calibration, variants, recipe, INPUTS, SEED)
    assert meter(partial(calibration, (8,))) < 1e-12
    assert meter(partial(calibration, (8, 8))) < 1e-12
    plan = partial(calibration, (8, 8))
    plan.bits[first] = (8, 2)  # one layer on a coarser grid in the last segment only: the meter sees it
    assert meter(plan) > 1e-6


def test_restarts_measure_exactly_what_a_full_run_measures(setup):
    """A child plan restarted from its parent's outputs gives the same float, with fewer denoiser calls."""
    calibration, recipe, warm = setup
    variants = solve_candidates(calibration, recipe, (3, 8), progress=False).variants
    first = next(iter(calibration.layers))
    child = partial(calibration, (8, 8))
    child.bits[first] = (8, 3)
    warm(partial(calibration, (8,)))  # the parent: segment 0 at 8 bits everywhere
    before = warm.denoiser_calls
    restarted = warm(child)
    cold = TrajectoryMeter(calibration, variants, recipe, INPUTS, SEED)
    assert restarted == cold(child)  # bit for bit: the sampler saw the same outputs
    (_, _), (start, end) = calibration.segments.step_ranges
    assert warm.denoiser_calls - before == cold.denoiser_calls * (end - start) // end  # segment 1 only
    calls = warm.denoiser_calls
    assert warm(child) == restarted  # the very same plan again: every call replayed
    assert warm.denoiser_calls == calls


def test_measure_batches_follow_the_calibration_batch_size(tiny_adapter, make_recipe):
    recipe = make_recipe("adatsq", segments=2, planner={"fisher": False, "candidates": [3, 8]})
    recipe = replace(recipe, calibration=replace(recipe.calibration, batch_size=1))
    calibration = calibrate(tiny_adapter(), recipe, progress=False)
    variants = solve_candidates(calibration, recipe, (3, 8), progress=False).variants
    sizes = []
    denoiser = calibration.adapter.denoiser()
    handle = denoiser.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        meter = TrajectoryMeter(calibration, variants, recipe, [1, 7, 3], SEED)
        meter(partial(calibration, (3,)))
    finally:
        handle.remove()
    assert len(meter.batches) == 3
    assert max(sizes) <= 2  # one input per call (twice with classifier-free guidance), never all three
