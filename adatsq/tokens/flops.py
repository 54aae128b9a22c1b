"""What token reduction saves, counted honestly: LM prefill FLOPs, KV-cache bytes, reducer overhead.

FLOPs are 2 x multiply-accumulates of the matmuls; elementwise work (norms, RoPE, softmax,
activations) is left out because it is small next to them at LM widths. Attention counts the full
seq x seq score and value products (dense kernels; a causal kernel skips about half). In-LM pruning
(FastV, PDrop) runs early layers on all tokens: pass per-layer sequence lengths from `layer_seq_lens`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from adatsq.errors import TokenReductionError
from adatsq.tokens.base import REDUCERS, get_reducer

__all__ = [
    "kv_cache_bytes",
    "layer_seq_lens",
    "lm_prefill_flops",
    "measure_latency",
    "reducer_overhead_flops",
]


def _per_layer(seq_len: int | Sequence[int], n_layers: int) -> list[int]:
    lens = [int(seq_len)] * n_layers if isinstance(seq_len, int) else [int(s) for s in seq_len]
    if len(lens) != n_layers or any(s < 0 for s in lens):
        raise TokenReductionError(
            f"seq_len must be an int >= 0 or one length per layer ({n_layers}), got {seq_len!r}"
        )
    return lens


def layer_seq_lens(
    n_layers: int, n_text: int, n_image: int, schedule: Sequence[tuple[int, int]] = ()
) -> list[int]:
    """Sequence length in each LM layer: text + image tokens, the image count changing at the layers of
    `schedule` [(first_layer, image_tokens)], e.g. FastV K=2: [(2, kept)]; PDrop: `pdrop_schedule`."""
    lens, image = [], n_image
    changes = dict(schedule)
    for layer in range(n_layers):
        image = changes.get(layer, image)
        lens.append(n_text + image)
    return lens


def lm_prefill_flops(
    n_layers: int,
    hidden: int,
    intermediate: int,
    n_heads: int,
    n_kv_heads: int,
    seq_len: int | Sequence[int],
    vocab: int | None = None,
    gated: bool = True,
    head_dim: int | None = None,
) -> int:
    """Prefill FLOPs of a decoder LM: q/k/v/o projections, QKᵀ and AV (quadratic in seq_len), the MLP
    (3 matrices when gated, as in SwiGLU; else 2) and, with `vocab`, the LM head on the last position
    only (what generation needs). `seq_len` may be one length per layer (in-LM pruning)."""
    if n_heads % max(n_kv_heads, 1) or min(n_layers, hidden, intermediate, n_heads, n_kv_heads) < 1:
        raise TokenReductionError(
            f"bad LM shape: layers={n_layers}, hidden={hidden}, intermediate={intermediate}, "
            f"heads={n_heads}, kv_heads={n_kv_heads} (kv_heads must divide heads; all >= 1)"
        )
    hd = head_dim or hidden // n_heads
    q, kv = n_heads * hd, n_kv_heads * hd
    total = 0
    for s in _per_layer(seq_len, n_layers):
        proj = 2 * s * hidden * (q + 2 * kv) + 2 * s * q * hidden
        attention = 2 * 2 * n_heads * s * s * hd
        mlp = 2 * s * hidden * intermediate * (3 if gated else 2)
        total += proj + attention + mlp
    if vocab:
        total += 2 * hidden * vocab
    return total


def kv_cache_bytes(
    n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int | Sequence[int], dtype_bytes: int = 2
) -> int:
    """Bytes of the K and V caches after prefill (per sequence); per-layer lengths allowed."""
    return sum(2 * n_kv_heads * head_dim * s * dtype_bytes for s in _per_layer(seq_len, n_layers))


def reducer_overhead_flops(method: str, n: int, d: int, k: int, **extra: int) -> int:
    """FLOPs a reducer adds on top of the (reduced) LM prefill, for one image of n tokens of width d:
    `get_reducer(method).overhead_flops(n, d, k, **extra)`; each reducer documents its formula and names
    the model measurements it needs in `overhead_inputs`.

    g2tr: `vae_flops` (generation-encoder pass, required) + anchor projection (`m` anchors of
    `latent_dim` channels) + scores + merge. fastv / pdrop: 0 here; their cost is the full tokens in
    the layers before pruning, which the caller counts with `layer_seq_lens`. vnorm: value norms (`dv`,
    default d). tome: the matching rounds (`r`). visionzip: target similarity (`n_ctx`) + sums.
    grid: distances to kept cells + region sums. random: 0.
    """
    if method not in REDUCERS.names():
        raise TokenReductionError(
            f"unknown reducer {method!r} for overhead; supported: {', '.join(REDUCERS.names())}"
        )
    return get_reducer(method).overhead_flops(n, d, k, **extra)


def measure_latency(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Wall-clock seconds of `fn()` (median / mean / min over `repeats` after `warmup`), synchronising
    CUDA around each call so asynchronous kernels are counted."""
    if repeats < 1 or warmup < 0:
        raise TokenReductionError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "repeats": float(repeats),
    }
