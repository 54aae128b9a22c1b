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
from adatsq.quant.kernels.scratch import scratch_matrix
from adatsq.quant.pack import unpack
from adatsq.quant.transforms import scaled_walsh_hadamard

# Elements of the int32 / float32 [M, N] intermediates per `torch._int_mm` call on the CPU: past this
# they spill out of cache (Xeon, 4096 tokens of a 3072^2 layer: 227-236 ms in 4 calls of 1024 rows
# against 280-301 ms in one; EPYC Zen 5, 1024 tokens of 3072 -> 12288: 59 ms in calls of 256 rows
# against 99 ms in one, 1536 -> 8960: 23 against 42 ms), so wide layers take fewer rows per call.
# oneDNN runs whole: its output is the only [M, N] tensor, and chunking it measured slower at every
# shape (6400 x 128 -> 512: 1.6 against 3.9 ms; 4096 x 3072^2: 93 against 104 ms).
ACC_ELEMENTS = 1024 * 3072
PLANAR_ROWS_PER_OUTPUT = 2.0


def row_chunk(out_features: int) -> int:
    """Rows per CPU `_int_mm` call: ACC_ELEMENTS over the layer's width (1024 rows at N = 3072)."""
    return max(16, ACC_ELEMENTS // out_features)


def int8_linear(x: Tensor, layer: torch.nn.Module, state: KernelState) -> Tensor:
    """y = sx * s * (a @ w.T - corr * sum(a)) + bias with a, w int8 and an exact int32 accumulator.

    a are the same per-token codes the reference fake-quantizes (`activation_codes`), w = q - z, so this
    is the reference function; only the float rounding of the products differs. Rows are independent
    (per-token codes), so the CPU `_int_mm` path runs them in chunks of `row_chunk` with the same result.
    """
    lead, n = x.shape[:-1], layer.out_features
    order = column_order(state, x.numel() // x.shape[-1], n)
    codes, sx = int8_codes(x, order, state.compiled_codes)
    w = state.weight
    if w is None:  # weights stay packed: unpack to int8 now, O(N*K) against the O(M*N*K) matmul
        w = pad_weight(_unpacked_int8(layer, state, order), state.rules)
    rows = codes.shape[0]
    if state.name == INT8_ONEDNN or x.device.type != "cpu":
        return _int8_rows(codes, sx, w, layer, state).to(x.dtype).reshape(*lead, n)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    chunk = row_chunk(n)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        out = y[part] if x.dtype == torch.float32 else None  # else the rescale goes via scratch
        rescaled = _int8_rows(codes[part], sx[part], w, layer, state, out)
        if out is None:
            y[part] = rescaled
    return y.reshape(*lead, n)


def column_order(state: KernelState, rows: int, out_features: int) -> int:
    """The column order of one call's int8 operands: k = `state.planar` (planar order) or 1 (natural).

    Planar order makes unpacking the weight cheap (one shift-and-mask per code slot, ~6x faster than
    interleaving at 3072 x 3072) and the activations' codes dearer (a strided division: 363 against
    182 us for 6400 x 128, 1044 against 617 us for 1024 x 3072 in bf16), so it pays while the weight
    is the larger operand: planar below PLANAR_ROWS_PER_OUTPUT rows per output feature.
    """
    return state.planar if rows < PLANAR_ROWS_PER_OUTPUT * out_features else 1


def _unpacked_int8(layer: torch.nn.Module, state: KernelState, order: int) -> Tensor:
    """The layer's int8 weight unpacked now into the shared buffer, in column `order` (`column_order`)."""
    out = scratch_matrix(layer.out_features, layer.in_features, torch.int8, layer.qweight.device)
    if order == 1:
        return int8_weight(layer, state.group_scale, out)
    return planar_int8_weight(layer, state.group_scale, out)


def _dequantized_per_call(layer: torch.nn.Module, dtype: torch.dtype) -> Tensor:
    """`layer.dequantized_weight(dtype)` bit for bit ((q - z) * s, the same ops in dtype, in place) in the
    shared buffer: codes unpacked slot by slot into it (`unpack(out=)`), no [N, K] temporaries."""
    n, cols = layer.out_features, layer.in_features
    if layer.group_size is not None and cols % layer.group_size:  # partial last group: the reference's way
        return layer.dequantized_weight(dtype)
    w = unpack(layer.qweight, layer.bits, cols, out=scratch_matrix(n, cols, dtype, layer.qweight.device))
    groups = w.view(n, layer.scales.shape[1], -1)
    groups.sub_(layer.zeros.to(dtype)[:, :, None]).mul_(layer.scales.to(dtype)[:, :, None])
    return w


def _int8_rows(
    a: Tensor, sx: Tensor, w: Tensor, layer: torch.nn.Module, state: KernelState, out: Tensor | None = None
) -> Tensor:
    """The rescaled float rows of one integer matmul (oneDNN's in its out_dtype).

    `_int_mm` on the CPU accumulates into a scratch buffer and rescales into `out` (float32 [rows, N],
    e.g. rows of the layer's output) or a second scratch buffer: fresh [M, N] intermediates each call
    made glibc return and re-fault their pages (3040 page faults, 4.1 against 0.45 ms a call for 4096
    tokens of 128 -> 384, intermittently, as the heap top was trimmed or not)."""
    if state.name == INT8_ONEDNN:  # oneDNN's output already carries the per-channel scale
        y = onednn.matmul_scaled(a, w, state.col_scale, state.out_dtype)
        if state.zero_corr is not None:
            y.sub_(a.sum(dim=1, dtype=torch.int32)[:, None] * state.zero_corr)
        sx = sx.to(y.dtype)  # [M, 1]: a mixed-dtype [M, N] pass measured 7x slower than this cast
        return y.mul_(sx) if state.bias is None else torch.addcmul(state.bias, y, sx, out=y)  # one pass
    rows, n = a.shape[0], layer.out_features
    cpu = a.device.type == "cpu"
    acc = int8_matmul(a, w, n, state.rules, scratch_matrix(rows, n, torch.int32, a.device) if cpu else None)
    if state.zero_corr is not None:
        acc.sub_(a.sum(dim=1, dtype=torch.int32)[:, None] * state.zero_corr)
    if out is None:
        out = (
            scratch_matrix(rows, n, torch.float32, a.device, "rescaled")
            if cpu
            else torch.empty_like(acc, dtype=torch.float32)
        )
    y = out.copy_(acc).mul_(sx).mul_(state.col_scale)  # in place: fewer passes than addcmul (measured)
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
        w = state.weight
        if w is None:  # autograd keeps the weight for x's gradient: then a tensor of its own
            keep = torch.is_grad_enabled() and x.requires_grad
            w = layer.dequantized_weight(x.dtype) if keep else _dequantized_per_call(layer, x.dtype)
        y = F.linear(fake_quantized(x, layer.act, state.compiled_fake), w, state.bias)
    return y if y_lowrank is None else y + y_lowrank
