"""Kernel layouts derived from a QuantLinear's checkpoint buffers at first call (never saved).

The checkpoint format stays the only stored form: codes q (packed), scales s (fp16) and zeros z (uint8)
with W = (q - z) * s. Everything here is recomputed from those buffers on the device and in the dtype
of the input that asks for it, so `state_dict()` never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.quant.kernels import onednn
from adatsq.quant.kernels.dispatch import (
    DEQUANT_CACHED,
    INT8_CACHED,
    INT8_ONEDNN,
    INT8_PER_CALL,
    SIMULATED_ACT,
)
from adatsq.quant.kernels.intmm import IntMMRules, int_mm_rules, pad_weight
from adatsq.quant.kernels.scratch import scratch_matrix
from adatsq.quant.pack import unpack


def int8_weight(
    layer: torch.nn.Module, group_scale: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """int8 [out, in] weight codes, zero point folded where it fits: q - z (bits < 8) or q - 128 (8 bits),
    times the integer group scale s2 (`integer_group_scale`) when the layer has one: s2 * (q - z).

    For bits < 8 both q and z are below 128, so q - z lies in [-127, 127] (and s2 * (q - z) too, as
    QuantLinear checks); 8-bit codes need the fixed offset 128 (see `zero_correction` for asymmetric ones).
    `out`: an int8 [out, in] tensor to write into (bits < 8; every element is written).
    """
    if layer.bits == 8:
        codes = unpack(layer.qweight, layer.bits, layer.in_features)
        return torch.bitwise_xor(codes, 128).view(torch.int8)
    target = None if out is None else out.view(torch.uint8)
    codes = unpack(layer.qweight, layer.bits, layer.in_features, out=target).contiguous()
    return _fold_groups_(codes.view(torch.int8), layer, group_scale, 1)


def codes_per_byte(bits: int, in_features: int, group_size: int | None = None) -> int:
    """k > 1 when `planar_int8_weight` applies (k codes in every byte, K a multiple of k, and for more
    than one group whole groups that are multiples of k), else 1."""
    k = 8 // bits if bits in (2, 4) else 1
    grouped = group_size is not None and group_size < in_features
    whole = not grouped or (in_features % group_size == 0 and group_size % k == 0)
    return k if in_features % k == 0 and whole else 1


def planar_int8_weight(
    layer: torch.nn.Module, group_scale: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """`int8_weight` with the columns in planar order: every k-th column, k runs (k = 8 / bits).

    Code slot i of every byte is one contiguous shift-and-mask into its own block of columns, ~6x faster
    than interleaving the slots back into column order (2.2 vs 13.9 ms at 3072² on one thread). The
    activations take the same column order (`actquant.int8_codes(x, planar=k)`), so the sum over K is
    the same integer. `out`: an int8 [out, in] tensor to write into (every element is written).
    """
    qweight, bits, in_features = layer.qweight, layer.bits, layer.in_features
    k = codes_per_byte(bits, in_features, layer.group_size)
    w = out
    if w is None:
        w = torch.empty(qweight.shape[0], in_features, dtype=torch.int8, device=qweight.device)
    block = in_features // k
    for slot in range(k):
        columns = w[:, slot * block : (slot + 1) * block].view(torch.uint8)
        torch.bitwise_right_shift(qweight, slot * bits, out=columns)
        if slot < k - 1:
            columns.bitwise_and_(2**bits - 1)
    return _fold_groups_(w, layer, group_scale, k)


def _fold_groups_(w: Tensor, layer: torch.nn.Module, group_scale: Tensor | None, k: int) -> Tensor:
    """w [out, in] int8 codes (column order, k = 1, or planar in k slots) -> (q - z) * s2 in place.

    In planar order slot i holds columns j * k + i, so each group's gs columns are gs / k adjacent ones
    in every slot (`codes_per_byte` allows k > 1 only for whole groups that are multiples of k). Group-wise
    weights reach the int8 path only on integer group scales (dispatch), so `group_scale` is given; the
    work is q * s2 - z * s2 in uint8 (exact: the true value lies in int8, and uint8 wraps modulo 256 as
    two's complement does) against [out, in / k] planes of s2 and z * s2, expanded per call into one
    scratch buffer. Broadcasting [out, groups, 1] over 32-wide groups instead took 5.2 + 6.5 ms per call
    at 3072 x 12288 on 2 threads, against about 1.8 ms per plane to expand and 2.2 ms per pass on it.
    """
    zeros = layer.zeros.view(torch.int8)
    rows, cols = w.shape
    if zeros.shape[1] == 1:  # per channel
        w.sub_(zeros)
        return w if group_scale is None else w.mul_(group_scale)
    gs, ng = layer.group_size, zeros.shape[1]
    whole = cols // gs
    codes = w.view(torch.uint8)
    scale = group_scale.view(torch.uint8)
    offset = layer.zeros * scale  # z * s2 <= 15 * 15: fits uint8
    body = codes.view(rows, k, whole * gs // k) if k > 1 else codes[:, : whole * gs].view(rows, 1, whole * gs)
    plane = scratch_matrix(rows, whole * gs // k, torch.uint8, w.device, "group-plane")
    for factor, op in ((scale, body.mul_), (offset, body.sub_)):
        plane.view(rows, whole, gs // k).copy_(factor[:, :whole, None].expand(rows, whole, gs // k))
        op(plane[:, None, :])
    if whole < ng:  # a partial last group (column order only)
        codes[:, whole * gs :].mul_(scale[:, whole:]).sub_(offset[:, whole:])
    return w


def integer_group_scale(layer: torch.nn.Module) -> Tensor | None:
    """int8 [out, n_groups] s2 = scales / channel_scales of a layer with integer group scales, else None."""
    if layer.channel_scales is None:
        return None
    return (layer.scales.float() / layer.channel_scales.float()[:, None]).round_().to(torch.int8)


def zero_correction(zeros: Tensor, bits: int) -> Tensor | None:
    """int32 [out]: z - 128 for 8-bit codes whose zero is not 128 (y -= (z - 128) * sum(a)), else None."""
    if bits != 8:
        return None
    corr = zeros[:, 0].to(torch.int32) - 128
    return corr if bool(corr.any()) else None


@dataclass(frozen=True)
class KernelState:
    """One layer's runnable form for one (device, dtype): what `forward.run` needs besides the layer.

    key: identifies the buffers and input kind it was derived from (stale when any changes).
    weight: cached int8 [N', K'] (int8-cached), oneDNN's prepacked int8 (int8-onednn) or dequantized
    [N, K] (dequant-cached), else None.
    col_scale / zero_corr: the integer path's per-channel rescale and 8-bit zero correction (int32
    for `_int_mm`'s accumulator; for oneDNN, whose output is already rescaled, float32 corr * col_scale).
    out_dtype: what the integer matmul's rescaled output is written in. float32, or for oneDNN on
    bf16 / fp16 inputs without a zero correction the input dtype itself: writing float32 [M, N] measured
    15-33 % of the layer's time at Flux shapes (1024 x 3072 -> 12288: 136 against 91 ms), for one
    more rounding to that dtype (max |diff| two bf16 steps instead of one, see tests).
    The float tensors (bias, transforms) are cast once to the input dtype (bias: to out_dtype).
    """

    name: str
    key: tuple
    rules: IntMMRules
    planar: int = 1  # > 1: int8-unpack-per-call may unpack in planar column order (`forward.column_order`)
    compiled: bool = False  # KernelPolicy.compiled on a CPU layer (`compiled_codes`, `compiled_fake`)
    weight: Tensor | None = None
    col_scale: Tensor | None = None
    zero_corr: Tensor | None = None
    group_scale: Tensor | None = None  # int8 [N, n_groups] s2 of integer group scales (`int8_weight`)
    bias: Tensor | None = None
    out_dtype: torch.dtype = torch.float32
    input_scale: Tensor | None = None  # `InputTransform.input_scale` in the input dtype
    rotate: bool = False  # then `walsh_hadamard`
    lowrank_a: Tensor | None = None
    lowrank_b: Tensor | None = None

    @property
    def integer(self) -> bool:
        return self.name in (INT8_CACHED, INT8_ONEDNN, INT8_PER_CALL)

    @property
    def compiled_codes(self) -> bool:
        """Whether the int8 codes of column-order calls come from the compiled loop (planar codes stay
        eager, where the division writes their order at no cost; inductor's gather ran 2x slower)."""
        return self.compiled and self.integer

    @property
    def compiled_fake(self) -> bool:
        """Whether the simulated activations (group-wise A8, A4) come from the compiled loop."""
        return self.compiled and SIMULATED_ACT in self.name


HALF_DTYPES = (torch.bfloat16, torch.float16)


def buffers_key(layer: torch.nn.Module) -> tuple:
    """(data_ptr, version) of every buffer: changes when a buffer is replaced or edited in place."""
    return tuple((t.data_ptr(), t._version) for t in layer.buffers())


def build_state(layer: torch.nn.Module, name: str, key: tuple, dtype: torch.dtype) -> KernelState:
    """Derive the layout `name` needs from `layer`'s buffers (already on the input's device)."""

    def cast(t: Tensor | None, to: torch.dtype = dtype) -> Tensor | None:
        return None if t is None else t.to(to)

    rules = int_mm_rules(layer.qweight.device.type)
    weight = col_scale = zero_corr = None
    bias = cast(layer.bias)
    out_dtype = torch.float32
    group_scale = None
    if name in (INT8_CACHED, INT8_ONEDNN, INT8_PER_CALL):
        group_scale = integer_group_scale(layer)
        col_scale = (layer.scales[:, 0] if group_scale is None else layer.channel_scales).float()
        zero_corr = zero_correction(layer.zeros, layer.bits)
        if name in (INT8_CACHED, INT8_ONEDNN):
            codes = int8_weight(layer, group_scale)
            weight = onednn.prepack(codes) if name == INT8_ONEDNN else pad_weight(codes, rules)
        if name == INT8_ONEDNN and zero_corr is not None:
            zero_corr = zero_corr * col_scale
        if name == INT8_ONEDNN and zero_corr is None and dtype in HALF_DTYPES and onednn.writes(dtype):
            out_dtype = dtype
        bias = cast(layer.bias, out_dtype)  # added before the one rounding to dtype
    elif name.startswith(DEQUANT_CACHED):
        weight = layer.dequantized_weight(dtype)
    planar = codes_per_byte(layer.bits, layer.in_features, layer.group_size) if name == INT8_PER_CALL else 1
    compiled = layer.kernel_policy.compiled and layer.qweight.device.type == "cpu"
    return KernelState(
        name, key, rules, planar, compiled, weight, col_scale, zero_corr, group_scale, bias, out_dtype,
        cast(layer.transform.input_scale()), layer.rotation_signs is not None,
        cast(layer.lowrank_a), cast(layer.lowrank_b),
    )  # fmt: skip
