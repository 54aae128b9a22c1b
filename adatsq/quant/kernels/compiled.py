"""Activation quantization as compiled loops (`KernelPolicy(compiled=True)`).

In eager torch, per-token int8 codes take several passes over the input with a float32 copy (upcast,
max, min, divide, round, cast): 2.9 ms for 1024 x 3072 bf16 on 2 threads, where the oneDNN matmul
they feed takes ~5-10 ms. torch.compile (inductor, C++ backend) fuses them into one reduction and one
elementwise loop: 1.2 ms, the same codes bit for bit (IEEE division and round-half-even in both;
tests/quant/test_kernels.py checks the edge rows). The price is a C++ compiler at run time and one
compilation per process (10-40 s on 2 cores; inductor caches it on disk), so it is opt-in. Planar codes
(the per-call 2/4-bit path) stay eager: inductor's gather into planar order measured 2x slower.
The simulated paths (group-wise A8, A4) compile their fake-quantization the same way: seven eager
passes (the above, then rescale and cast back) become two loops, 4.9 -> 2.2 ms at 1024 x 3072 bf16,
the same values bit for bit.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from adatsq.errors import ConfigError
from adatsq.quant.scheme import ActScheme, activation_codes, fake_quant_activation


@functools.cache
def available() -> bool:
    """Whether torch.compile's CPU backend can build here (it needs a C++ compiler on PATH)."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def _codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """`activation_codes(x, 8)` as int8: the one definition, traced whole so inductor fuses it."""
    codes, scale = activation_codes(x, 8)
    return codes.to(torch.int8), scale


def _fake(x: Tensor, bits: int) -> Tensor:
    """`fake_quant_activation` at `bits`, traced whole (one graph per bit-width)."""
    return fake_quant_activation(x, ActScheme(bits))


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _run(fn: Callable, *args: Any) -> Any:
    if not available():
        raise ConfigError(
            "KernelPolicy(compiled=True) needs a C++ compiler for torch.compile (none of g++, c++, clang++ "
            "is on PATH); install one or use the default KernelPolicy()"
        )
    with torch.no_grad():  # one graph whatever the caller's grad mode (codes carry no gradient)
        return _compiled(fn)(*args)


def int8_codes(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, float32 scales [M, 1]) of 2-D `rows`, compiled on first use."""
    return _run(_codes, rows)


def fake_quantized(rows: Tensor, bits: int) -> Tensor:
    """`fake_quant_activation(rows, ActScheme(bits))` of 2-D `rows`, compiled on first use."""
    return _run(_fake, rows, bits)


def warm_up(dtype: torch.dtype, codes: bool, fake_bits: Iterable[int] = ()) -> None:
    """Compile now (at load) for `dtype` inputs what the layers will call (int8 codes, fake-quantization
    at each bit-width), so no sampling step pays for it (one row is its own graph: dynamo specializes
    size 1, e.g. the adaLN modulation of one sample)."""
    for rows in (17, 1):
        x = torch.ones(rows, 96, dtype=dtype)
        if codes:
            int8_codes(x)
        for bits in fake_bits:
            fake_quantized(x, bits)
