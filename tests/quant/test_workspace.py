"""The GPTQ memory formula against the bytes a real solve keeps alive (every tensor counted by storage)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adatsq.quant.gptq import gptq
from adatsq.quant.scheme import WeightScheme
from adatsq.quant.workspace import gptq_workspace_bytes


class PeakBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still referenced, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors referencing it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize(
    ("cols", "rows", "act_order", "group"),
    [(256, 64, False, None), (256, 512, True, 64), (384, 128, True, None), (128, 512, False, 32)],
)
def test_formula_bounds_a_real_solve(cols, rows, act_order, group):
    torch.manual_seed(0)
    x = torch.randn(2 * cols, cols)
    W = torch.randn(rows, cols)
    with PeakBytes() as meter:
        H = (x.T @ x).double()  # the engine hands the solver a float64 Hessian: part of the need
        gptq(W, H, WeightScheme(bits=4, group_size=group), act_order=act_order)
    bound = gptq_workspace_bytes(cols, rows)
    assert 0.85 * bound <= meter.peak <= bound, (meter.peak, bound)


def test_formula():
    assert gptq_workspace_bytes(15360, 3072) == 8 * (5 * 15360**2 + 7 * 3072 * 15360 + 2 * 3072 * 128)
    assert gptq_workspace_bytes(512, 8) == 8 * (6 * 512**2 + 8 * 512 + 2 * 8 * 128)


def test_the_factorisation_moment_dominates_narrow_layers():
    """out << in: six [in, in] float64 matrices meet in the Cholesky step."""
    test_formula_bounds_a_real_solve(512, 32, True, 64)
