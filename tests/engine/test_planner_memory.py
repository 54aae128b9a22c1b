"""The AdaTSQ candidates + error table stay within the GPTQ solve's memory (what the schedule reserves).

Every tensor created inside the solve is counted by its storage while it is referenced. The error table
used to hold the candidates' float64 H beside up to three float64 segment means (4 · 8 · in² bytes,
twice the solve's two [in, in] matrices): a full-width Wan block's ffn.net.2 (in 8960) then peaked about
1.2 GiB over `adatsq estimate`'s prediction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_probe import PeakBytes
from torch import nn

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.segments import SegmentMap
from adatsq.checkpoint.format import LayerSpec
from adatsq.engine.calibration import Calibration
from adatsq.engine.planner import error_rows, layer_errors, solve_candidates
from adatsq.engine.solve import solve_variant
from adatsq.errors import CalibrationError
from adatsq.quant.workspace import gptq_workspace_bytes
from adatsq.recipe import recipe_from_dict

IN, OUT, GROUP = 512, 32, 64
SHAPES = [(IN, OUT), (64, 2048), (128, 3)]  # in, out: wide, tall (the differences dominate), tiny
RECIPE = recipe_from_dict(
    {
        "method": "adatsq",
        "weight": {"bits": 4, "group_size": GROUP, "symmetric": False},
        "calibration": {"samples": 2, "steps": 4, "batch_size": 1, "segments": 2},
        "planner": {"candidates": [4, 8]},
    }
)


def _layer(n_in: int = IN, n_out: int = OUT) -> tuple[nn.Linear, LayerStats]:
    torch.manual_seed(0)
    x = torch.randn(2, 4 * n_in, n_in)
    stats = LayerStats(x.transpose(1, 2) @ x, torch.tensor([4 * n_in, 4 * n_in]), x.abs().amax(dim=1))
    return nn.Linear(n_in, n_out), stats


def _variants(linear: nn.Linear, stats: LayerStats) -> dict:
    spec = LayerSpec((4,), GROUP, False)
    W, H = linear.weight.detach(), stats.hessian()
    return {b: solve_variant(W, H, stats.absmax.amax(dim=0), spec.scheme(b), RECIPE) for b in (4, 8)}


def test_error_table_holds_one_float64_segment_mean_and_its_values_do_not_change():
    linear, stats = _layer()
    variants = _variants(linear, stats)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    with PeakBytes(stats.xtx, linear.weight) as meter:
        rows = layer_errors(linear.weight.detach(), stats, variants, weights)
    assert meter.peak <= 8 * IN * IN + 48 * error_rows(OUT) * IN, meter.peak  # one [in, in], a few rows
    expected = np.zeros((2, 2))  # the former loop order: bits outer, segments inner
    for b, variant in enumerate(variants.values()):
        D = linear.weight.detach().double() - variant.weight.dequantize().double()
        for s in range(2):
            H = stats.xtx[s].double() / int(stats.tokens[s])
            expected[s, b] = float(weights[s]) * float(((D @ H) * D).sum())
    np.testing.assert_allclose(rows, expected, rtol=1e-12)  # row chunks: another float64 summation order


@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_candidates_and_error_table_stay_within_the_solve_the_schedule_reserves(n_in, n_out):
    linear, stats = _layer(n_in, n_out)
    with PeakBytes(stats.xtx, linear.weight) as meter:
        candidates = solve_candidates(_calibration(stats, linear), RECIPE, (4, 8), progress=False)
    packed = sum(v.weight.nbytes() for v in candidates.variants["l"].values())
    bound = gptq_workspace_bytes(n_in, n_out, RECIPE.gptq.block_size, group_size=GROUP) + packed
    assert meter.peak <= bound, (meter.peak, bound)


def _calibration(stats: LayerStats, linear: nn.Linear) -> Calibration:
    segments = SegmentMap.from_schedule([999.0, 750.0, 500.0, 250.0], 2)
    return Calibration(
        None, {"l": linear}, segments, [{"l": stats}], torch.full((4,), 0.25), "uniform", 0.0, 2
    )


def test_a_segment_that_gave_a_layer_no_tokens_is_an_error_not_a_free_zero():
    linear, stats = _layer(64, 16)
    stats.xtx[1].zero_()
    stats.tokens[1] = 0  # the layer did not run at the steps of segment 1
    expected = r"'l' received no calibration tokens in timestep segment 1 \(sampler steps 2-3\).*ignore list"
    with pytest.raises(CalibrationError, match=expected):
        solve_candidates(_calibration(stats, linear), RECIPE, (4, 8), progress=False)
