"""GPTQ (Frantar et al., 2022) as one pure function: (W, H, scheme) -> codes, scales, zeros, loss, damping.

Variable names follow the paper and its reference code (W, H, Hinv, W1, Err1). Differences from the
reference, all deliberate:
* Cholesky failures escalate damping (x10 per try up to `max_damp`, then CalibrationError) and the result
  records it; nothing falls back silently to RTN.
* The inverse factor is computed in float64, and the column loop runs in float64 too (cheap on CPU).
* With groups the block size is rounded to a multiple of the group size, so a group's scale/zero is
  computed from columns that already carry every update from the columns before it.
* Scales are float16-exact (see scheme.py), so `loss` is the error of the weights that actually run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import CalibrationError, ConfigError
from adatsq.quant.scheme import QuantizedWeight, WeightScheme, compute_qparams, quant_error, quantize_codes


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
    if not bool(torch.isfinite(H).all()):
        raise CalibrationError("the Hessian has NaN/inf entries; check the calibration activations")


def gptq(
    W: Tensor,
    H: Tensor,
    scheme: WeightScheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    max_damp: float = 1.0,
) -> GPTQResult:
    """Quantize W [out, in] column by column, pushing each column's error onto the columns not yet done.

    H [in, in] is the (weighted) sum of x x^T over calibration inputs. act_order processes columns by
    descending diag(H); codes are returned in the original column order. With groups and act_order the
    grids are those of the original contiguous groups, fixed before the loop ("static groups"), so
    checkpoints store no column permutation and dequantization needs no gather.
    """
    _check_inputs(W, H, damp, block_size, max_damp)
    W_orig, H_orig = W, H
    W = W.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    cols = W.shape[1]

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    # Damped Cholesky factor of H^-1 (upper), escalating the damping while either factorisation fails.
    ratio, escalations = damp, 0
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(cols, dtype=torch.float64, device=H.device)
    while True:
        L, info = torch.linalg.cholesky_ex(H + ratio * mean_diag * eye)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                break
        ratio, escalations = ratio * 10, escalations + 1
        if ratio > max_damp * (1 + 1e-9):
            raise CalibrationError(
                f"Cholesky of the damped Hessian failed up to damp={ratio / 10:g} (max_damp={max_damp}); "
                f"the Hessian is far from positive definite: use more calibration tokens or raise max_damp"
            )

    gs = scheme.group_size
    static = gs is not None and perm is not None
    if gs is None:  # per output channel: one grid, settled before the column loop
        scale, zero = compute_qparams(W, scheme)
        scales, zeros = [scale], [zero]
    elif static:  # act-order: grids of the ORIGINAL contiguous groups, so no permutation is stored
        W0 = W[:, torch.argsort(perm)]
        grids = [compute_qparams(W0[:, g : g + gs], scheme) for g in range(0, cols, gs)]
        scales, zeros = [s for s, _ in grids], [z for _, z in grids]
        column_group = perm // gs  # group of the column at each processing position
    else:
        scales, zeros = [], []
        block_size = max(gs, block_size // gs * gs)  # groups never straddle two blocks
    Q = torch.zeros_like(W)  # codes, in processing order

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if static:
                scale, zero = scales[column_group[i1 + i]], zeros[column_group[i1 + i]]
            elif gs is not None and (i1 + i) % gs == 0:  # lazy group grid on the updated columns
                scale, zero = compute_qparams(W1[:, i : i + gs], scheme)
                scales.append(scale)
                zeros.append(zero)
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w, scale, zero, scheme.bits)
            Q[:, i1 + i] = q
            err1 = (w - (q - zero.double()) * scale.double()) / d
            W1[:, i:] -= err1[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    weight = QuantizedWeight(
        codes=Q.to(torch.uint8),
        scales=torch.stack(scales, dim=1),
        zeros=torch.stack(zeros, dim=1).to(torch.uint8),
        bits=scheme.bits,
        group_size=gs,
    )
    return GPTQResult(
        weight=weight,
        loss=quant_error(W_orig, weight.dequantize(), H_orig),
        damp=ratio,
        damp_escalations=escalations,
        dead_columns=int(dead.sum()),
    )
