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
from adatsq.quant.pack import unpack


def int8_weight(qweight: Tensor, zeros: Tensor, bits: int, in_features: int) -> Tensor:
    """int8 [out, in] weight codes, zero point folded where it fits: q - z (bits < 8) or q - 128 (8 bits).

    For bits < 8 both q and z are below 128, so q - z lies in [-127, 127]; 8-bit codes need the fixed
    offset 128 (see `zero_correction` for asymmetric ones).
    """
    codes = unpack(qweight, bits, in_features)
    if bits == 8:
        return torch.bitwise_xor(codes, 128).view(torch.int8)
    return torch.sub(codes.view(torch.int8), zeros.view(torch.int8))


def codes_per_byte(bits: int, in_features: int) -> int:
    """k > 1 when `planar_int8_weight` applies (k codes in every byte, K a multiple of k), else 1."""
    k = 8 // bits if bits in (2, 4) else 1
    return k if in_features % k == 0 else 1


def planar_int8_weight(
    qweight: Tensor, zeros: Tensor, bits: int, in_features: int, out: Tensor | None = None
) -> Tensor:
    """int8 [out, in] q - z with the columns in planar order: every k-th column, k runs (k = 8 / bits).

    Code slot i of every byte is one contiguous shift-and-mask into its own block of columns, ~6x faster
    than interleaving the slots back into column order (2.2 vs 13.9 ms at 3072² on one thread). The
    activations take the same column order (`actquant.int8_codes(x, planar=k)`), so the sum over K is
    the same integer. `out`: an int8 [out, in] tensor to write into (every element is written).
    """
    k = codes_per_byte(bits, in_features)
    w = out
    if w is None:
        w = torch.empty(qweight.shape[0], in_features, dtype=torch.int8, device=qweight.device)
    block = in_features // k
    for slot in range(k):
        columns = w[:, slot * block : (slot + 1) * block].view(torch.uint8)
        torch.bitwise_right_shift(qweight, slot * bits, out=columns)
        if slot < k - 1:
            columns.bitwise_and_(2**bits - 1)
    return w.sub_(zeros.view(torch.int8))


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
    planar: int = 1  # > 1: int8-unpack-per-call unpacks into planar column order (`planar_int8_weight`)
    compiled: bool = False  # KernelPolicy.compiled on a CPU layer (`compiled_codes`, `compiled_fake`)
    weight: Tensor | None = None
    col_scale: Tensor | None = None
    zero_corr: Tensor | None = None
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
        """Whether the int8 codes come from the compiled loop: column order only (planar codes stay
        eager, where the division writes their order at no cost; inductor's gather ran 2x slower)."""
        return self.compiled and self.integer and self.planar == 1

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
    if name in (INT8_CACHED, INT8_ONEDNN, INT8_PER_CALL):
        col_scale = layer.scales[:, 0].float()
        zero_corr = zero_correction(layer.zeros, layer.bits)
        if name in (INT8_CACHED, INT8_ONEDNN):
            codes = int8_weight(layer.qweight, layer.zeros, layer.bits, layer.in_features)
            weight = onednn.prepack(codes) if name == INT8_ONEDNN else pad_weight(codes, rules)
        if name == INT8_ONEDNN and zero_corr is not None:
            zero_corr = zero_corr * col_scale
        if name == INT8_ONEDNN and zero_corr is None and dtype in HALF_DTYPES and onednn.writes(dtype):
            out_dtype = dtype
        bias = cast(layer.bias, out_dtype)  # added before the one rounding to dtype
    elif name.startswith(DEQUANT_CACHED):
        weight = layer.dequantized_weight(dtype)
    planar = codes_per_byte(layer.bits, layer.in_features) if name == INT8_PER_CALL else 1
    compiled = layer.kernel_policy.compiled and layer.qweight.device.type == "cpu"
    return KernelState(
        name, key, rules, planar, compiled, weight, col_scale, zero_corr, bias, out_dtype,
        cast(layer.transform.input_scale()), layer.rotation_signs is not None,
        cast(layer.lowrank_a), cast(layer.lowrank_b),
    )  # fmt: skip
