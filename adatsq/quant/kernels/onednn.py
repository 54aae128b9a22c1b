"""oneDNN's int8 linear (`torch.ops.onednn.qlinear_*`): the x86 CPU path that reaches AMX / VNNI.

`torch._int_mm` on CPU multiplies plain row-major int8 and measured ~1.3x bf16 on an AMX Xeon, where
oneDNN with its weight prepacked into the blocked AMX layout measured 1.7-2.7x (reports/kernels.md).
oneDNN takes one activation scale per tensor only, so the matmul runs with scale 1 and the per-channel
weight scales fused into its output (float32, or the bf16 / fp16 input dtype); the caller applies the
per-token scale after.
Prepacking costs about as much as 5 matmuls of 1024 rows, so only a cached int8 weight uses it.
Without AMX (AMD EPYC Zen 5 here) that blocked layout falls to oneDNN's reference kernel, ~500x slower,
and the plain [K, N] layout runs its VNNI kernel instead: `prepack` picks per CPU, probed once.
"""

from __future__ import annotations

import functools
import timeit

import torch
from torch import Tensor


@functools.cache
def available() -> bool:
    """True when this torch build runs oneDNN's int8 linear on this CPU and gets exact integer products.

    Probed once on a small layer against an int64 matmul: a build without the ops, a CPU oneDNN does
    not support, or any wrong product means "not available" (the `_int_mm` path runs instead).
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8)
    try:
        y = matmul_scaled(a, prepack(w), torch.ones(24))
    except RuntimeError:
        return False
    return torch.equal(y.double(), (a.long() @ w.long().T).double())


@functools.cache
def writes(dtype: torch.dtype) -> bool:
    """True when oneDNN's int8 linear writes `dtype` output here within one rounding of the float32 one
    (probed once per dtype, as `available`; False sends the output through float32)."""
    if not available():
        return False
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (5, 40), generator=g, dtype=torch.int8)
    packed = prepack(torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8))
    scale = torch.rand(24, generator=g) + 0.5
    try:
        y = matmul_scaled(a, packed, scale, dtype)
    except RuntimeError:
        return False
    exact = matmul_scaled(a, packed, scale)
    return y.dtype == dtype and torch.equal(y, exact.to(dtype))


def prepack(weight: Tensor) -> Tensor:
    """int8 [N, K] -> the oneDNN weight this CPU runs fastest (an opaque tensor; rebuilt from the
    checkpoint, never saved): the prepacked blocked layout where `blocked_layout_runs_jit`, else plain
    [K, N]."""
    if blocked_layout_runs_jit():
        return torch.ops.onednn.qlinear_prepack(weight, None)
    return _plain(weight)


def layout() -> str:
    """The weight layout `prepack` writes on this CPU, in words (for `adatsq inspect`)."""
    if blocked_layout_runs_jit():
        return "prepacked blocked layout"
    return "plain [K, N] layout (the prepacked one has no JIT kernel on this CPU)"


def _plain(weight: Tensor) -> Tensor:
    return weight.t().contiguous().to_mkldnn()


@functools.cache
def blocked_layout_runs_jit() -> bool:
    """Whether the prepacked (blocked) weight layout runs one of oneDNN's JIT kernels on this CPU.

    On AMX Xeons it is oneDNN's fastest layout. On a CPU without AMX (seen: AMD EPYC Zen 5 with AVX-512
    VNNI) oneDNN runs that layout with its reference kernel `ref_int8`, ~500x slower (43 against
    0.09 ms at 64 x 256 x 256), while the plain [K, N] layout runs its VNNI brgemm. Timed once on that
    small problem, each layout warmed up, the fastest of 3 calls: a gap that large cannot come from load.
    """
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (256, 256), generator=g, dtype=torch.int8)
    scale = torch.ones(256)
    try:
        blocked = _fastest_call(a, torch.ops.onednn.qlinear_prepack(w, None), scale)
        plain = _fastest_call(a, _plain(w), scale)
    except RuntimeError:
        return False
    return blocked <= 4 * plain


def _fastest_call(a: Tensor, packed: Tensor, scale: Tensor) -> float:
    matmul_scaled(a, packed, scale)  # warm-up: oneDNN builds the kernel
    return min(timeit.repeat(lambda: matmul_scaled(a, packed, scale), number=1, repeat=3))


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.int64)  # weight zero points: the codes are already q - z


def matmul_scaled(
    a: Tensor, packed: Tensor, col_scale: Tensor, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """[M, N] = (a @ w.T) * col_scale in out_dtype with a int8 [M, K], the int32 sum exact inside oneDNN."""
    return torch.ops.onednn.qlinear_pointwise(
        a, 1.0, 0, packed, col_scale, _zero_points(col_scale.shape[0]), None, 1.0, 0, out_dtype,
        "none", [], "",
    )  # fmt: skip
