"""The forward pass of each kernel, given a layer and its KernelState (see dispatch.py for which runs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adatsq.quant.kernels import onednn
from adatsq.quant.kernels.actquant import fake_quantized, int8_codes
from adatsq.quant.kernels.dispatch import INT8_ONEDNN
from adatsq.quant.kernels.intmm import int8_matmul, pad_weight
from adatsq.quant.kernels.layouts import KernelState, int8_weight, planar_int8_weight
from adatsq.quant.transforms import scaled_walsh_hadamard

# Rows per `torch._int_mm` call on the CPU: its int32 / float32 [M, N] intermediates spill out of
# cache on long inputs (4096 tokens of a 3072^2 layer: 227-236 ms in 4 calls of 1024 rows against
# 280-301 ms in one). oneDNN runs whole: its output is the only [M, N] tensor, and chunking it measured
# slower at every shape (6400 x 128 -> 512: 1.6 against 3.9 ms; 4096 x 3072^2: 93 against 104 ms).
ROW_CHUNK = 1024


def int8_linear(x: Tensor, layer: torch.nn.Module, state: KernelState) -> Tensor:
    """y = sx * s * (a @ w.T - corr * sum(a)) + bias with a, w int8 and an exact int32 accumulator.

    a are the same per-token codes the reference fake-quantizes (`activation_codes`), w = q - z, so this
    is the reference function; only the float rounding of the products differs. Rows are independent
    (per-token codes), so the CPU `_int_mm` path runs them in chunks of ROW_CHUNK with the same result.
    """
    lead = x.shape[:-1]
    codes, sx = int8_codes(x, state.planar, state.compiled_codes)
    w = state.weight
    if w is None:  # weights stay packed: unpack to int8 now, O(N*K) against the O(M*N*K) matmul
        unpack = planar_int8_weight if state.planar > 1 else int8_weight
        w = pad_weight(unpack(layer.qweight, layer.zeros, layer.bits, layer.in_features), state.rules)
    if codes.shape[0] <= ROW_CHUNK or state.name == INT8_ONEDNN or x.device.type != "cpu":
        return _int8_rows(codes, sx, w, layer, state).to(x.dtype).reshape(*lead, layer.out_features)
    y = torch.empty(codes.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for start in range(0, codes.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        y[rows] = _int8_rows(codes[rows], sx[rows], w, layer, state)
    return y.reshape(*lead, layer.out_features)


def _int8_rows(a: Tensor, sx: Tensor, w: Tensor, layer: torch.nn.Module, state: KernelState) -> Tensor:
    if state.name == INT8_ONEDNN:  # oneDNN's output already carries the per-channel scale
        y = onednn.matmul_scaled(a, w, state.col_scale, state.out_dtype)
        if state.zero_corr is not None:
            y.sub_(a.sum(dim=1, dtype=torch.int32)[:, None] * state.zero_corr)
        sx = sx.to(y.dtype)  # [M, 1]: a mixed-dtype [M, N] pass measured 7x slower than this cast
        return y.mul_(sx) if state.bias is None else torch.addcmul(state.bias, y, sx, out=y)  # one pass
    acc = int8_matmul(a, w, layer.out_features, state.rules)
    if state.zero_corr is not None:
        acc = acc - a.sum(dim=1, dtype=torch.int32)[:, None] * state.zero_corr
    y = acc.float().mul_(sx).mul_(state.col_scale)  # in place: fewer passes than addcmul (measured)
    return y if state.bias is None else y.add_(state.bias)


def run(layer: torch.nn.Module, state: KernelState, x: Tensor) -> Tensor:
    """The layer's output with the kernel `state` describes (transforms and low-rank branch included)."""
    x = scaled_walsh_hadamard(x, state.input_scale, state.rotate)
    y_lowrank = None
    if state.lowrank_a is not None:  # full precision branch on the unquantized transformed input
        y_lowrank = F.linear(F.linear(x, state.lowrank_a), state.lowrank_b)
    if state.integer:
        y = int8_linear(x, layer, state)
    else:
        w = state.weight if state.weight is not None else layer.dequantized_weight(x.dtype)
        y = F.linear(fake_quantized(x, layer.act, state.compiled_fake), w, state.bias)
    return y if y_lowrank is None else y + y_lowrank
