"""Bit-packing of unsigned codes, run on every QuantLinear forward (so fully vectorised).

Layout: each row is a little-endian bitstream. Code ``j`` occupies bits ``[j*bits, (j+1)*bits)`` of the
row, bit ``k`` of the row being bit ``k % 8`` of byte ``k // 8``. A row of ``C`` codes takes
``ceil(C * bits / 8)`` bytes; unused high bits of the last byte are zero. For 2/4/8 bits a byte holds
whole codes; for 3 and 6 bits codes are handled in chunks of 24 bits (8 or 4 codes in 3 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import ConfigError
from adatsq.quant.scheme import WEIGHT_BITS, QuantizedWeight, dequantize_codes


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) per chunk: the smallest run of codes that ends on a byte boundary."""
    if bits not in WEIGHT_BITS:
        raise ConfigError(f"cannot pack {bits}-bit codes; allowed bits: {WEIGHT_BITS}")
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of `cols` codes."""
    return -(-cols * bits // 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [R, C] (each < 2**bits) -> uint8 [R, ceil(C*bits/8)]."""
    k, nb = _chunk(bits)
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ConfigError(f"pack expects uint8 [rows, cols]; got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ConfigError(f"code {int(codes.max())} does not fit in {bits} bits")
    rows, cols = codes.shape
    n_chunks = -(-cols // k)
    c = torch.zeros(rows, n_chunks * k, dtype=torch.uint8, device=codes.device)
    c[:, :cols] = codes
    if nb == 1:  # 2/4/8 bits: whole codes per byte; bit fields never overlap, so the sum is an OR
        shifts = torch.arange(k, dtype=torch.uint8, device=codes.device) * bits
        packed = (c.view(rows, n_chunks, k) << shifts).sum(dim=-1, dtype=torch.uint8)
    else:  # 3/6 bits: a 24-bit int32 per chunk, then split into its 3 bytes
        shifts = torch.arange(k, dtype=torch.int32, device=codes.device) * bits
        value = (c.view(rows, n_chunks, k).to(torch.int32) << shifts).sum(dim=-1, dtype=torch.int32)
        byte_shifts = torch.arange(nb, dtype=torch.int32, device=codes.device) * 8
        packed = ((value[..., None] >> byte_shifts) & 0xFF).to(torch.uint8)
    return packed.reshape(rows, n_chunks * nb)[:, : packed_cols(cols, bits)].contiguous()


def unpack(packed: Tensor, bits: int, cols: int, out: Tensor | None = None) -> Tensor:
    """uint8 [R, ceil(cols*bits/8)] -> uint8 codes [R, cols]; the inverse of `pack`.

    out: a [R, cols] tensor of any dtype to write the codes into instead (returned). 2/4-bit codes
    whose rows fill whole bytes go in one code slot at a time, no temporary larger than one slot
    (R * cols / k bytes): the per-call kernels dequantize into a shared buffer this way.
    """
    k, nb = _chunk(bits)
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, packed_cols(cols, bits)):
        raise ConfigError(
            f"unpack expects uint8 [rows, {packed_cols(cols, bits)}] for {cols} {bits}-bit codes; "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if out is not None and nb == 1 and k > 1 and cols % k == 0:
        slots = out.view(rows, cols // k, k)  # code slot i of byte j is column j * k + i
        for i in range(k):
            field = packed >> (i * bits)
            slots[:, :, i].copy_(field if i == k - 1 else field.bitwise_and_(2**bits - 1))
        return out
    codes = _unpacked(packed, bits, cols, k, nb)
    return codes if out is None else out.copy_(codes)


def _unpacked(packed: Tensor, bits: int, cols: int, k: int, nb: int) -> Tensor:
    if bits == 8:
        return packed
    rows, n_chunks = packed.shape[0], -(-cols // k)
    p = packed
    if n_chunks * nb != p.shape[1]:
        p = torch.zeros(rows, n_chunks * nb, dtype=torch.uint8, device=packed.device)
        p[:, : packed.shape[1]] = packed
    mask = 2**bits - 1
    if nb == 1:
        # one shift per code slot, stacked: ~4x faster on CPU than broadcasting a uint8 shift tensor
        fields = [p >> (i * bits) & mask for i in range(k - 1)] + [p >> ((k - 1) * bits)]
        codes = torch.stack(fields, dim=-1)  # [R, n_chunks, k]
    else:
        byte_shifts = torch.arange(nb, dtype=torch.int32, device=packed.device) * 8
        value = (p.view(rows, n_chunks, nb).to(torch.int32) << byte_shifts).sum(dim=-1, dtype=torch.int32)
        shifts = torch.arange(k, dtype=torch.int32, device=packed.device) * bits
        codes = ((value[..., None] >> shifts) & mask).to(torch.uint8)
    return codes.reshape(rows, n_chunks * k)[:, :cols]


@dataclass(frozen=True)
class PackedWeight:
    """A QuantizedWeight with its codes packed: how solved variants wait (bits per weight, not a byte)."""

    qweight: Tensor  # uint8 [out, packed_cols(in_features, bits)]
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int | None
    in_features: int
    channel_scales: Tensor | None = None

    @classmethod
    def of(cls, weight: QuantizedWeight) -> PackedWeight:
        return cls(
            pack(weight.codes, weight.bits),
            weight.scales,
            weight.zeros,
            weight.bits,
            weight.group_size,
            weight.codes.shape[1],
            weight.channel_scales,
        )

    def unpacked(self) -> QuantizedWeight:
        codes = unpack(self.qweight, self.bits, self.in_features)
        return QuantizedWeight(
            codes, self.scales, self.zeros, self.bits, self.group_size, self.channel_scales
        )

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """The float32 [out, in] matrix the codes stand for (only `rows` of it: a bounded part)."""
        codes = unpack(self.qweight[rows], self.bits, self.in_features)
        return dequantize_codes(codes, self.scales[rows], self.zeros[rows], self.group_size)

    def nbytes(self) -> int:
        tensors = (self.qweight, self.scales, self.zeros, self.channel_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
