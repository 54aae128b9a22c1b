"""The GPTQ memory formula against the bytes a real solve keeps alive (every tensor counted by storage)."""

from __future__ import annotations

import pytest
import torch
from memory_probe import PeakBytes

from adatsq.quant.gptq import gptq
from adatsq.quant.scheme import WeightScheme
from adatsq.quant.workspace import gptq_workspace_bytes


@pytest.mark.parametrize(
    ("cols", "rows", "act_order", "group", "overwrite_h"),
    [
        (256, 64, False, None, False),
        (256, 512, True, 64, False),
        (384, 128, True, None, False),
        (128, 512, False, 32, False),
        (256, 512, True, 64, True),
        (700, 300, False, 32, True),
    ],
)
def test_formula_bounds_a_real_solve(cols, rows, act_order, group, overwrite_h):
    torch.manual_seed(0)
    x = torch.randn(2 * cols, cols)
    with PeakBytes() as meter:
        W = torch.randn(rows, cols)  # the inputs the engine holds for the solve are part of the need
        H = (x.T @ x).double()
        meter.peak = meter.current  # the solve's peak, not the float32 product that built H
        result = gptq(
            W, H, WeightScheme(bits=4, group_size=group), act_order=act_order, overwrite_h=overwrite_h
        )
    assert result.loss > 0
    bound = gptq_workspace_bytes(cols, rows, group_size=group, overwrite_h=overwrite_h)
    assert 0.85 * bound <= meter.peak <= bound, (meter.peak, bound)


def test_formula():
    # Flux's widest layer: the two [in, in] float64 matrices, W and its float32 working copy, the grids
    # of groups of 32 and the objective's row block (12.09 GB before, without W)
    i, o = 15360, 3072
    held = 8 * o * i + 12 * o * 480 + 64 * (o + i)
    assert gptq_workspace_bytes(i, o) == held + 16 * i * i + 8 * 256 * i + 4 * 256 * i == 4_218_421_248
    assert gptq_workspace_bytes(i, o, overwrite_h=True) == held + 8 * i * i + o * i + 9 * o * 480
    assert gptq_workspace_bytes(512, 8, group_size=None) == (
        8 * 8 * 512 + 12 * 8 + 64 * 520 + 16 * 512**2 + 8 * 8 * 512 + 8 * 8 * 256 + 8 * 256**2
    )


def test_two_hessians_dominate_narrow_layers():
    """out << in: the caller's H and the solver's buffer are nearly all of it."""
    test_formula_bounds_a_real_solve(512, 32, True, 64, False)
    assert gptq_workspace_bytes(512, 32, group_size=64) < 16 * 512**2 / 0.8
    assert gptq_workspace_bytes(2048, 64, group_size=64) < 16 * 2048**2 / 0.95
