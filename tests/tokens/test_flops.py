"""FLOPs, KV bytes and reducer overhead against hand counts."""

import pytest

from adatsq.errors import TokenReductionError
from adatsq.tokens.baselines import pdrop_schedule
from adatsq.tokens.flops import (
    kv_cache_bytes,
    layer_seq_lens,
    lm_prefill_flops,
    measure_latency,
    reducer_overhead_flops,
)


def _layer_by_hand(s, h=64, i=128, heads=4, kv=2, gated=True):
    hd = h // heads
    proj = 2 * s * h * heads * hd + 2 * 2 * s * h * kv * hd + 2 * s * heads * hd * h  # q, k+v, o
    attn = 2 * heads * s * s * hd + 2 * heads * s * s * hd  # QK^T and AV
    mlp = (3 if gated else 2) * 2 * s * h * i
    return proj + attn + mlp


def test_prefill_flops_by_hand():
    assert lm_prefill_flops(3, 64, 128, 4, 2, 10) == 3 * _layer_by_hand(10)
    assert lm_prefill_flops(1, 64, 128, 4, 2, 10, gated=False) == _layer_by_hand(10, gated=False)
    assert lm_prefill_flops(1, 64, 128, 4, 2, 10, vocab=1000) == _layer_by_hand(10) + 2 * 64 * 1000
    assert lm_prefill_flops(2, 64, 128, 4, 2, [10, 4]) == _layer_by_hand(10) + _layer_by_hand(4)


def test_attention_term_is_quadratic():
    base = lm_prefill_flops(1, 64, 128, 4, 4, 100) - lm_prefill_flops(1, 64, 128, 4, 4, 50) * 2
    assert base == 2 * 2 * 4 * (100**2 - 2 * 50**2) * 16


def test_kv_cache_bytes():
    assert kv_cache_bytes(28, 4, 128, 1000, 2) == 28 * 2 * 4 * 128 * 1000 * 2
    assert kv_cache_bytes(2, 1, 8, [10, 5], 4) == 2 * 8 * 10 * 4 + 2 * 8 * 5 * 4


def test_fastv_counts_full_tokens_before_layer_k():
    lens = layer_seq_lens(6, n_text=20, n_image=100, schedule=[(2, 50)])
    assert lens == [120, 120, 70, 70, 70, 70]
    fastv = lm_prefill_flops(6, 64, 128, 4, 2, lens)
    pruned_at_input = lm_prefill_flops(6, 64, 128, 4, 2, 70)
    assert fastv == 2 * _layer_by_hand(120) + 4 * _layer_by_hand(70) > pruned_at_input
    pdrop = layer_seq_lens(8, 0, 64, pdrop_schedule(64, 8, 4, 0.5))
    assert pdrop == [64, 64, 32, 32, 16, 16, 8, 8]


def test_reducer_overhead_by_hand():
    n, d, k = 100, 16, 50
    merge = 2 * n * d + 2 * (n - k) * k * d + 2 * n * d
    score = 6 * n * d + 2 * 25 * d
    assert reducer_overhead_flops("g2tr", n, d, k, vae_flops=1000, m=25, latent_dim=64) == (
        1000 + 2 * 25 * 64 * d + score + merge
    )
    with pytest.raises(TokenReductionError, match="vae_flops"):
        reducer_overhead_flops("g2tr", n, d, k)
    assert reducer_overhead_flops("fastv", n, d, k) == 0
    assert reducer_overhead_flops("vnorm", n, d, k, dv=8) == 2 * n * 8
    # ToMe, one round of 10 tokens to 5: A = B = 5
    assert reducer_overhead_flops("tome", 10, d, 5) == 3 * 10 * d + 2 * 5 * 5 * d + 2 * 10 * d
    with pytest.raises(TokenReductionError, match="supported: fastv"):
        reducer_overhead_flops("magic", n, d, k)


def test_measure_latency_reports_repeats():
    calls = []
    stats = measure_latency(lambda: calls.append(1), repeats=3, warmup=1)
    assert len(calls) == 4 and stats["repeats"] == 3 and stats["min_s"] <= stats["median_s"]


def test_bad_shapes_fail():
    with pytest.raises(TokenReductionError, match="kv_heads must divide heads"):
        lm_prefill_flops(1, 64, 128, 4, 3, 10)
    with pytest.raises(TokenReductionError, match="one length per layer"):
        lm_prefill_flops(2, 64, 128, 4, 2, [10])
