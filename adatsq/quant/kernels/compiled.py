"""The activation quantization of the integer kernels as one compiled loop (`KernelPolicy(compiled=True)`).

In eager torch, per-token int8 codes take five passes over the input with float32 intermediates
(|x|, max, divide, round, cast): 14.4 ms for 1024 x 3072 bf16 on 2 threads, where the int8 matmul they
feed takes ~21 ms. torch.compile (inductor, C++ backend) fuses them into one reduction and one
elementwise loop: 1.2 ms, the same codes bit for bit (IEEE division and round-half-even in both;
tests/quant/test_kernels.py checks the edge rows). The price is a C++ compiler at run time and one
compilation per process (~40 s on 2 cores; inductor caches it on disk), so it is opt-in. Planar codes
(the per-call 2/4-bit path) stay eager: inductor's gather into planar order measured 2x slower.
"""

from __future__ import annotations

import functools
import shutil

import torch
from torch import Tensor

from adatsq.errors import ConfigError
from adatsq.quant.scheme import activation_codes


@functools.cache
def available() -> bool:
    """Whether torch.compile's CPU backend can build here (it needs a C++ compiler on PATH)."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def _codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """`activation_codes(x, 8)` as int8: the one definition, traced whole so inductor fuses it."""
    codes, scale = activation_codes(x, 8)
    return codes.to(torch.int8), scale


@functools.cache
def _compiled():
    return torch.compile(_codes, dynamic=True)


def int8_codes(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, float32 scales [M, 1]) of 2-D `rows`, compiled on first use."""
    if not available():
        raise ConfigError(
            "KernelPolicy(compiled=True) needs a C++ compiler for torch.compile (none of g++, c++, clang++ "
            "is on PATH); install one or use the default KernelPolicy()"
        )
    with torch.no_grad():  # one graph whatever the caller's grad mode (codes carry no gradient)
        return _compiled()(rows)


def warm_up(dtype: torch.dtype) -> None:
    """Compile now (at load) for `dtype` inputs, so no sampling step pays for it (one row is its own
    graph: dynamo specializes size 1, e.g. the adaLN modulation of one sample)."""
    for rows in (17, 1):
        int8_codes(torch.ones(rows, 96, dtype=dtype))
