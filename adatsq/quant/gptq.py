"""GPTQ (Frantar et al., 2022) as one pure function: (W, H, scheme) -> codes, scales, zeros, loss, damping.

Variable names follow the paper and its reference code (W, H, Hinv, W1, Err1). As published: a group's
grid is computed when the loop reaches its first column, from the lazily updated W (every earlier
block's update applied, none from inside the current block); under act-order the grids are those of the
original contiguous groups ("static groups"). Differences from the reference, all deliberate:
* Cholesky failures escalate damping (x10 per try up to `max_damp`, then CalibrationError) and the result
  records it; nothing falls back silently to RTN.
* Memory: one float64 [in, in] buffer besides the caller's H (none with overwrite_h); it holds H's
  strict lower triangle and U, the upper factor of the damped H⁻¹, computed in float64 in place
  (gptq_factor.py). Weights are kept transposed, [in, out], so a column is a contiguous row.
* The column loop runs in float32 on the float64 U's rows (cast one block at a time); each quantized
  column overwrites its own row, so the loop ends holding the dequantized weight.
* `loss` is the exact objective tr((W − Q) H (W − Q)ᵀ) on the undamped H given by the caller, in
  float64 from that triangle (out · in² flops, half a dense product; O(out · in) memory).
* Scales are float16-exact (see scheme.py), so `loss` is the error of the weights that actually run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import CalibrationError, ConfigError
from adatsq.quant.gptq_factor import damped_inverse_factor_, objective, permute_rows_, permute_symmetric_
from adatsq.quant.scheme import QuantizedWeight, WeightScheme, channel_scales, compute_qparams, n_groups

GRID_GROUPS = 4  # groups per compute_qparams call in _grids
CODE_COLUMNS = 8  # columns per step of _codes


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # tr((W - Q) H (W - Q)^T) on the undamped H given by the caller
    damp: float  # damping ratio finally used (times mean diag H)
    damp_escalations: int  # how many times Cholesky failed and the damping was multiplied by 10
    dead_columns: int  # input columns with diag(H) == 0 (never activated): zeroed in the result


def _check_inputs(W: Tensor, H: Tensor, damp: float, block_size: int, max_damp: float) -> None:
    if W.ndim != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ConfigError(
            f"gptq needs W [out, in] and H [in, in]; got W {tuple(W.shape)}, H {tuple(H.shape)}"
        )
    if not 0 < damp <= max_damp:
        raise ConfigError(f"damp={damp} must satisfy 0 < damp <= max_damp={max_damp}")
    if block_size <= 0:
        raise ConfigError(f"block_size={block_size} must be a positive int (default 128)")
    if not bool(torch.isfinite(H.amax()) & torch.isfinite(H.amin())):  # max/min propagate NaN
        raise CalibrationError("the Hessian has NaN/inf entries; check the calibration activations")


def _grids(Wt: Tensor, scheme: WeightScheme, out: tuple[Tensor, ...], channel: Tensor | None) -> None:
    """Min-max grids of the groups of Wt [cols, rows] (from a group boundary on; one group per channel)
    into out = (scale, lo, hi), each [groups, rows], with lo = -zero and hi = maxq - zero; channel: the
    rows' per-channel scales of an integer-group-scale grid (fixed from the original W), else None.

    compute_qparams sees each group as its (min, max) pair: the same grid (it is a min-max grid), from
    reductions over strided views instead of a float64 copy of the weights; GRID_GROUPS at a time."""
    cols, rows = Wt.shape
    gs = scheme.group_size or cols
    for g0 in range(0, -(-cols // gs), GRID_GROUPS):
        part = Wt[g0 * gs : (g0 + GRID_GROUPS) * gs]
        full, k = part.shape[0] // gs, -(-part.shape[0] // gs)
        groups = part[: full * gs].view(full, gs, rows)
        lows, highs = [groups.amin(1)], [groups.amax(1)]  # [full, rows]
        if full < k:  # a partial last group
            lows.append(part[full * gs :].amin(0, keepdim=True))
            highs.append(part[full * gs :].amax(0, keepdim=True))
        pairs = torch.stack([torch.cat(lows).view(-1), torch.cat(highs).view(-1)], dim=1)  # [k * rows, 2]
        scale, zero = (
            t.view(k, rows)
            for t in compute_qparams(pairs, scheme, None if channel is None else channel.repeat(k))
        )
        out[0][g0 : g0 + k] = scale
        out[1][g0 : g0 + k] = -zero
        out[2][g0 : g0 + k] = (2**scheme.bits - 1) - zero


def _factor(A: Tensor, diagonal: Tensor, damp: float, max_damp: float) -> tuple[float, int]:
    """Factor A in place (gptq_factor.py), escalating the damping while H + damping is not PD."""
    ratio, escalations, mean = damp, 0, float(diagonal.mean())
    while not damped_inverse_factor_(A, diagonal, ratio * mean):
        ratio, escalations = ratio * 10, escalations + 1
        if ratio > max_damp * (1 + 1e-9):
            raise CalibrationError(
                f"Cholesky of the damped Hessian failed up to damp={ratio / 10:g} (max_damp={max_damp}); "
                f"the Hessian is far from positive definite: use more calibration tokens or raise max_damp"
            )
    return ratio, escalations


def _column_loop(
    Wt: Tensor,
    A: Tensor,
    scheme: WeightScheme,
    grids: tuple[Tensor, ...],
    group_of: list[int],
    block: int,
    lazy: int | None,
    channel: Tensor | None,
) -> None:
    """Quantize Wt [cols, rows] (processing order) in place, row i ending as column i dequantized.

    A's upper triangle is U (Hinv in the reference code). grids: (scale, lo, hi) [groups, rows], filled
    here block by block for lazy groups of `lazy` columns (no act-order), from Wt as the block starts.
    """
    cols, rows = Wt.shape
    scale, lo, hi = (list(t.unbind(0)) for t in grids)
    Err1 = Wt.new_empty(min(block, cols), rows)
    Hinv_rows = Wt.new_empty(min(block, cols), cols)  # U's rows of one block, in float32
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if lazy is not None and -(-i1 // lazy) < -(-i2 // lazy):  # groups starting in [i1, i2)
            g0, g1 = -(-i1 // lazy), -(-i2 // lazy)
            _grids(Wt[g0 * lazy : g1 * lazy], scheme, tuple(t[g0:g1] for t in grids), channel)
        Hinv1 = Hinv_rows[: i2 - i1, : cols - i1].copy_(A[i1:i2, i1:])  # read above the diagonal only
        inv_d = (1.0 / A.diagonal()[i1:i2]).tolist()
        for i in range(i2 - i1):
            g, w = group_of[i1 + i], Wt[i1 + i]
            q = torch.div(w, scale[g]).round_().clamp_(lo[g], hi[g]).mul_(scale[g])  # dequantized
            torch.sub(w, q, out=Err1[i]).mul_(inv_d[i])
            w.copy_(q)
            Wt[i1 + i + 1 : i2].addr_(Hinv1[i, i + 1 : i2 - i1], Err1[i], alpha=-1)
        Wt[i2:].addmm_(Hinv1[:, i2 - i1 :].t(), Err1[: i2 - i1], alpha=-1)  # lazy batch update


def _codes(Wt: Tensor, grids: tuple[Tensor, ...], group_of: list[int], perm: Tensor | None) -> Tensor:
    """uint8 codes [rows, cols] in the original column order from the dequantized Wt (exact)."""
    cols, rows = Wt.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=Wt.device)
    group = torch.tensor(group_of, device=Wt.device)
    order = perm if perm is not None else torch.arange(cols, device=Wt.device)
    for c0 in range(0, cols, CODE_COLUMNS):
        g = group[c0 : c0 + CODE_COLUMNS]
        q = torch.div(Wt[c0 : c0 + CODE_COLUMNS], grids[0][g]).round_().sub_(grids[1][g])  # (q - z) + z
        codes[:, order[c0 : c0 + CODE_COLUMNS]] = q.t().to(torch.uint8)
    return codes


def gptq(
    W: Tensor,
    H: Tensor,
    scheme: WeightScheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    max_damp: float = 1.0,
    overwrite_h: bool = False,
) -> GPTQResult:
    """Quantize W [out, in] column by column, pushing each column's error onto the columns not yet done.

    H [in, in] is the (weighted) sum of x x^T over calibration inputs, any float dtype; it is read, never
    written, unless overwrite_h=True: then a contiguous float64 H is the solver's workspace and holds
    garbage afterwards (one [in, in] float64 matrix less; workspace.py). act_order processes columns by
    descending diag(H); codes are returned in the original column order. With groups and act_order the
    grids are those of the original contiguous groups, fixed before the loop ("static groups"), so
    checkpoints store no column permutation and dequantization needs no gather.
    """
    _check_inputs(W, H, damp, block_size, max_damp)
    rows, cols = W.shape
    W, H = W.detach(), H.detach()
    diagonal = H.diagonal().to(torch.float64, copy=True)  # the caller's, undamped: for the loss
    dead = diagonal == 0
    work_diag = diagonal.masked_fill(dead, 1.0)
    perm = torch.argsort(work_diag, descending=True, stable=True) if act_order else None
    in_place = overwrite_h and H.dtype == torch.float64 and H.is_contiguous()
    A = H if in_place else H.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    if perm is not None:
        permute_symmetric_(A, perm)
        diagonal, work_diag = diagonal[perm], work_diag[perm]
    ratio, escalations = _factor(A, work_diag, damp, max_damp)

    Wt = torch.empty(cols, rows, dtype=torch.float32, device=W.device)  # W transposed: a column per row
    Wt.copy_(W.t())
    Wt[dead] = 0.0
    gs = scheme.group_size
    grids = tuple(torch.zeros(n_groups(cols, gs), rows, device=W.device) for _ in range(3))
    channel = channel_scales(Wt.t(), scheme) if scheme.integer_group_scales else None
    if gs is None or perm is not None:  # per channel, or static groups: settled before the loop
        _grids(Wt, scheme, grids, channel)
    if perm is not None:
        permute_rows_(Wt, perm)
    if gs is None:
        group_of = [0] * cols
    else:
        group_of = ((torch.arange(cols) if perm is None else perm.cpu()) // gs).tolist()
    lazy = gs if gs is not None and perm is None else None
    _column_loop(Wt, A, scheme, grids, group_of, block_size, lazy, channel)
    loss = objective(A, diagonal, W, Wt, perm)
    del A
    weight = QuantizedWeight(
        codes=_codes(Wt, grids, group_of, perm),
        scales=grids[0].t().contiguous(),
        zeros=grids[1].t().neg().to(torch.uint8),
        bits=scheme.bits,
        group_size=gs,
        channel_scales=channel,
    )
    return GPTQResult(
        weight=weight, loss=loss, damp=ratio, damp_escalations=escalations, dead_columns=int(dead.sum())
    )
