"""The GPTQ reference loop (IST-DASLab gptq.py `fasterquant`), transcribed: the yardstick of
tools/bench_core.py (quality) and tools/bench_gptq.py (time, memory, objective).

Independent of adatsq.quant.gptq, so it checks it. Left out of the published loop: dead columns (the
random Hessians here have none) and the per-column `Losses` bookkeeping (a little less work for the
reference). Its grids are not rounded to float16 as adatsq's are.
"""

from __future__ import annotations

import torch

from adatsq.quant.scheme import WeightScheme


def reference_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: WeightScheme,
    act_order: bool,
    stale_grid: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dequantized weight [out, in] (in `dtype`) of the reference loop with block 128 and damping 0.01.

    stale_grid=True reads a group's grid from the lazily updated W, as published (and as adatsq does);
    False reads it from the intra-block-updated columns. dtype float32 is the published precision
    (`W.float()` and a float32 H); float64 is the stricter transcription the quality checks use.
    """
    W, H = W.to(dtype, copy=True), H.to(dtype, copy=True)
    maxq, gs, cols = 2**scheme.bits - 1, scheme.group_size, W.shape[1]

    def grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        if scheme.symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if scheme.symmetric else torch.round(-xmin / scale)
        return scale, zero

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += 0.01 * torch.diag(H).mean() * torch.eye(cols, dtype=dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scale, zero = grid(W)
    for i1 in range(0, cols, 128):
        i2 = min(i1 + 128, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if gs is not None and (i1 + i) % gs == 0:
                scale, zero = grid(W[:, i1 + i : i1 + i + gs] if stale_grid else W1[:, i : i + gs])
            w, d = W1[:, i], Hinv1[i, i]
            q = (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q if perm is None else Q[:, torch.argsort(perm)]
