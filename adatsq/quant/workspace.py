"""Peak memory of one GPTQ solve (`adatsq.quant.gptq.gptq`) on CPU, as a function of the layer's shape.

Read from the code and checked by measurement (tests/quant/test_workspace.py counts the bytes of every
tensor alive during a real solve). Counted: the caller's float64 Hessian and float32 weight (the inputs
the engine holds for the solve) and everything the solver allocates:

* [in, in]: the caller's H and the solver's float64 buffer A (H's strict lower triangle, then U in the
  upper one; gptq_factor.py). LAPACK factorises A in place, so the factorisation adds O(in) bytes.
  With overwrite_h=True, A is the caller's H: one [in, in] matrix instead of two.
* [out, in]: the caller's W and the working weight, transposed, in float32 (4 · out·in each), and the
  grids (scale, lo, hi: 12 · out per group);
* on top, the largest of: the column loop's block of errors and of U's rows in float32
  (4 · b · (out + in)) and a block's lazy grids; the objective's E in float64, r = min(out, 256) rows at
  a time, built through a float32 gather under act-order (12 · r · in), later beside its [r, k] product
  and [k, k] diagonal block (8 · r · in + 8 · r·k + 8 · k², k = min(in, 256)); the uint8 codes once A
  is freed (the caller's H stays, so one [in, in] matrix is counted there with or without overwrite_h).

On other devices the factorisation uses torch's cholesky_ex and solve_triangular instead, which allocate
about three more [in, in] float64 matrices; this formula does not cover that.

For Flux's widest layer (in 15360, out 3072, group 32) that is 4.22 GB (3.93 GiB), 2.34 GB with
overwrite_h; the solver before this layout peaked at 8 · (max(6 · in² + out·in, 5 · in² + 7 · out·in)
+ 2 · out · min(block, in)) = 12.09 GB without counting W.
"""

from __future__ import annotations

from adatsq.quant.gptq_factor import LOSS_BLOCK, LOSS_ROWS
from adatsq.quant.scheme import n_groups


def gptq_workspace_bytes(
    in_features: int,
    out_features: int,
    block_size: int = 128,
    *,
    group_size: int | None = 32,
    overwrite_h: bool = False,
) -> int:
    """Peak bytes of one CPU GPTQ solve of a [out, in] weight, its float64 H and float32 W included.

    held + max(h · 8 · in² + max(loop, objective), 8 · in² + codes) with h = 2 (1 with overwrite_h):
    held = 8 · out·in + 12 · out · groups + 64 · (out + in) (W, the working weight, the grids, vectors),
    loop = 4 · b · (out + in) + 64 · out · ⌈b / group_size⌉, b = min(block, in),
    objective = 8 · r · in + max(4 · r · in, 8 · r·k + 8 · k²), r = min(out, 256), k = min(in, 256),
    codes = out·in + 9 · out · groups.
    group_size: the smallest group size the caller solves with (None: per output channel only).
    """
    i, o = in_features, out_features
    groups = n_groups(i, group_size)
    b, r, k = min(block_size, i), min(o, LOSS_ROWS), min(i, LOSS_BLOCK)
    held = 8 * o * i + 12 * o * groups + 64 * (o + i)
    loop = 4 * b * (o + i) + (0 if group_size is None else 64 * o * min(groups, -(-b // group_size)))
    objective = 8 * r * i + max(4 * r * i, 8 * r * k + 8 * k * k)
    codes = o * i + 9 * o * groups
    return held + max((1 if overwrite_h else 2) * 8 * i * i + max(loop, objective), 8 * i * i + codes)
