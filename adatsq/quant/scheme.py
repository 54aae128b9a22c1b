"""Quantization schemes and the quantization grid shared by RTN, GPTQ and the runtime layer.

Grid conventions (one place, so RTN, GPTQ, checkpoints and QuantLinear agree bit for bit):

* Codes are unsigned integers ``q`` in ``[0, 2**bits - 1]``; a weight is ``(q - zero) * scale``.
* Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split into ``2**bits - 1`` steps and ``zero`` is the
  rounded integer code of 0.0, so zero stays exactly representable (dead columns, padding).
* Symmetric: ``zero`` is fixed at the mid code ``2**(bits - 1)`` and ``scale = 2 * absmax / (2**bits - 1)``
  (the GPTQ / AutoGPTQ convention: all ``2**bits`` codes are usable, the most positive value clips
  by half a step).
* Zero points are stored as ``uint8`` (they are integers in ``[0, 2**bits - 1]``).
* Scales are rounded UP to float16 when they are computed (clamped to ``[SCALE_MIN, float16 max]``):
  checkpoints and QuantLinear store them in float16, rounding up front means GPTQ optimises (and
  reports the loss of) exactly the weights that run, and rounding up means the grid never clips the
  group's range (beyond the half step of the symmetric convention). Groups with absmax below ~1e-5
  fall into float16 subnormals and get a relatively coarser scale.
* Groups run along the input dimension: column ``j`` belongs to group ``j // group_size``; when
  ``in_features`` is not a multiple of ``group_size`` the last group is partial (no error).
* Integer group scales (``WeightScheme(integer_group_scales=True)``, QServe's progressive grid): every
  group scale of a row is ``s1 * s2``, one per-channel ``s1`` times a small integer ``s2`` in
  ``[1, group_scale_limit]``, chosen so that ``s2 * (q - zero)`` always fits int8. The group-wise
  weight is then an int8 matrix with one scale per output channel, which the integer kernels multiply
  at int8 speed; the float path sees ordinary group scales. ``s1`` keeps few enough significant bits
  (``CHANNEL_SCALE_BITS``) that ``s1 * s2`` is exact in float16, so the stored group scales are the
  exact products and every path computes the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adatsq.errors import ConfigError

WEIGHT_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 8)
SCALE_MIN = 2.0**-24  # smallest (subnormal) float16; a scale is never 0, so w / scale stays finite
_SCALE_MAX = 65504.0  # largest float16

MAX_GROUP_SIZE = 2**20  # columns: a group wider than this is per-channel quantization spelled oddly
INT8_MAX = 127
INTEGER_GROUP_BITS = (2, 3, 4, 6)  # widths whose codes times an integer group scale fit int8
MAX_GROUP_SCALE = 15  # integer group scales take 4 bits, so the per-channel scale keeps 11 - 4 of fp16's
CHANNEL_SCALE_BITS = 11 - MAX_GROUP_SCALE.bit_length()  # 11 significant bits in float16


@dataclass(frozen=True)
class WeightScheme:
    """How one weight matrix is quantized.

    group_size: columns sharing one scale/zero along the input dimension; None = one per output channel.
    Any positive int is accepted (32/64/128 are the usual choices); a partial last group is allowed.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    # group scales = per-channel scale x small integer (module docstring); a plan's 8-bit variants are
    # then per channel (`variant_grid`)
    integer_group_scales: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in WEIGHT_BITS:
            raise ConfigError(f"weight bits={self.bits!r} is not supported; allowed values: {WEIGHT_BITS}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ConfigError(
                f"group_size={gs!r} is invalid; use None (per output channel) or a positive int "
                f"such as 32, 64 or 128"
            )
        if gs is not None and gs > MAX_GROUP_SIZE:
            raise ConfigError(
                f"group_size={gs} is wider than any layer's input (limit {MAX_GROUP_SIZE}); use None "
                "(per output channel) for one group per row"
            )
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric={self.symmetric!r} must be True or False")
        if not isinstance(self.integer_group_scales, bool):
            raise ConfigError(f"integer_group_scales={self.integer_group_scales!r} must be True or False")
        if self.integer_group_scales and gs is None:
            raise ConfigError(
                "integer_group_scales needs a group_size: per-channel scales are already one per row "
                "(drop integer_group_scales, or set group_size: 64)"
            )
        if self.integer_group_scales and self.bits not in INTEGER_GROUP_BITS:
            raise ConfigError(
                "integer_group_scales needs bits <= 6: an integer multiple of an 8-bit code does not fit "
                "int8 (use group_size: null for 8-bit integer kernels)"
            )


@dataclass(frozen=True)
class ActScheme:
    """Activation fake-quantization: dynamic, per token (last dim), symmetric. bits=None turns it off."""

    bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in ACT_BITS):
            raise ConfigError(
                f"activation bits={self.bits!r} is not supported; allowed values: None (off) or {ACT_BITS}"
            )


def n_groups(in_features: int, group_size: int | None) -> int:
    """Number of scale/zero columns for a weight with `in_features` inputs (last group may be partial)."""
    return 1 if group_size is None else -(-in_features // group_size)


def variant_grid(group_size: int | None, integer_group_scales: bool, bits: int) -> tuple[int | None, bool]:
    """(group size, integer group scales) of one bit-width's variant of a layer with these settings.

    Under integer group scales the 2-6-bit variants use them and an 8-bit variant has one scale per
    row, the integer grid with s2 = 1 (no larger multiple of an 8-bit code fits int8), so every variant
    of a plan runs the int8 kernels. The one rule: solve, load, validate, inspect, export, plan bytes."""
    integer = integer_group_scales and bits in INTEGER_GROUP_BITS
    return (None if integer_group_scales and not integer else group_size), integer


def variant_scheme(
    bits: int, group_size: int | None, symmetric: bool, integer_group_scales: bool
) -> WeightScheme:
    """The WeightScheme of one bit-width's variant of a layer quantized with these settings."""
    group, integer = variant_grid(group_size, integer_group_scales, bits)
    return WeightScheme(bits, group, symmetric, integer)


def group_scale_limit(bits: int, symmetric: bool) -> int:
    """The largest integer group scale s2 with s2 * (q - zero) inside int8 for every code of the grid.

    |q - zero| reaches 2**(bits-1) on the symmetric grid and 2**bits - 1 on an asymmetric one (a group
    of one sign has its zero at an end), so 4-bit allows 15 and 8 levels; capped at MAX_GROUP_SCALE."""
    reach = 2 ** (bits - 1) if symmetric else 2**bits - 1
    return max(1, min(MAX_GROUP_SCALE, INT8_MAX // reach))


def _round_up_to_bits(scale: Tensor, bits: int) -> Tensor:
    """The smallest number >= scale with `bits` significant bits and no bit below 2**-24 (float64).

    Such a number times an integer of 11 - bits bits has at most 11 significant bits, none below fp16's
    smallest subnormal: an exact float16 whenever it is in range."""
    exponent = torch.floor(torch.log2(scale))
    step = torch.exp2(torch.clamp(exponent - (bits - 1), min=-24.0))
    return torch.ceil(scale / step) * step


def channel_scales(W: Tensor, scheme: WeightScheme) -> Tensor:
    """Per-row s1 of the integer-group-scale grid, float32 [rows]: the row's widest min-max group scale
    over the group-scale limit, rounded up to CHANNEL_SCALE_BITS, so every group of W fits s2 <= limit."""
    rows, cols = W.shape
    gs = scheme.group_size or cols
    widest = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for g0 in range(0, cols, gs):
        scale, _ = _minmax_scale(W[:, g0 : g0 + gs].detach().to(torch.float64), scheme)
        widest = torch.maximum(widest, scale)
    limit = group_scale_limit(scheme.bits, scheme.symmetric)
    s1 = (widest / limit).clamp(SCALE_MIN, 2.0**11)  # s1 * 15 stays far inside float16
    return _round_up_to_bits(s1, CHANNEL_SCALE_BITS).float()


def _minmax_scale(W: Tensor, scheme: WeightScheme) -> tuple[Tensor, Tensor | None]:
    """(unrounded min-max scale, xmin or None when symmetric) per row of a float64 W."""
    maxq = 2**scheme.bits - 1
    if scheme.symmetric:
        return 2.0 * W.abs().amax(dim=1) / maxq, None
    xmin = W.amin(dim=1).clamp(max=0.0)
    return (W.amax(dim=1).clamp(min=0.0) - xmin) / maxq, xmin


def _round_up_to_float16(scale: Tensor) -> Tensor:
    """Smallest float16 >= scale (as float64): the stored grid always covers the group's range."""
    half = scale.to(torch.float16)
    inf = torch.tensor(float("inf"), dtype=torch.float16, device=scale.device)
    return torch.where(half.double() < scale, torch.nextafter(half, inf), half).double()


def compute_qparams(W: Tensor, scheme: WeightScheme, channel: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Min-max scale and integer zero point per row of `W` [rows, cols] -> (scale, zero), float32 [rows].

    channel: the rows' per-channel scales s1 (`channel_scales`) when the scheme has integer group
    scales: the scale is then s1 * s2, the smallest integer multiple covering the range (capped at
    `group_scale_limit`: a range GPTQ's updates widened past it clips, as a per-channel grid would)."""
    maxq = 2**scheme.bits - 1
    scale, xmin = _minmax_scale(W.detach().to(torch.float64), scheme)
    if channel is None:
        scale = _round_up_to_float16(scale.clamp(SCALE_MIN, _SCALE_MAX))
    else:
        s1 = channel.to(torch.float64)
        limit = group_scale_limit(scheme.bits, scheme.symmetric)
        scale = torch.ceil(scale / s1).clamp(1, limit) * s1
    if scheme.symmetric:
        zero = torch.full_like(scale, float(2 ** (scheme.bits - 1)))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale.float(), zero.float()


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes (same float dtype as `w`) of `w` on the grid (scale, zero); broadcasting as given."""
    scale, zero = scale.to(w.dtype), zero.to(w.dtype)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(codes - zero[group]) * scale[group] for codes [out, in] and scales/zeros [out, n_groups]."""
    rows, cols = codes.shape
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    if group_size is None or cols % group_size == 0:
        n = scales.shape[1]  # fast path: a reshape instead of a gather
        c = codes.to(dtype).view(rows, n, cols // n)  # [out, n_groups, group_size]
        return ((c - zeros[:, :, None]) * scales[:, :, None]).view(rows, cols)
    idx = torch.arange(cols, device=codes.device) // group_size  # partial last group
    return (codes.to(dtype) - zeros[:, idx]) * scales[:, idx]


@dataclass
class QuantizedWeight:
    """A quantized matrix before packing: what RTN / GPTQ return and what QuantLinear packs.

    codes: uint8 [out, in] in ORIGINAL column order; scales float32 [out, n_groups] (float16-exact);
    zeros uint8 [out, n_groups] (mid code 2**(bits-1) when symmetric). Groups are always contiguous
    (group = column // group_size; GPTQ act-order uses static groups), so no column index is stored.
    channel_scales float32 [out]: with integer group scales, the s1 every row's scales are multiples of.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int | None
    channel_scales: Tensor | None = None

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        expected = (rows, n_groups(cols, self.group_size))
        if self.codes.dtype != torch.uint8 or tuple(self.scales.shape) != expected:
            raise ConfigError(
                f"QuantizedWeight: codes must be uint8 [out, in] and scales [out, n_groups]; got codes "
                f"{self.codes.dtype} {tuple(self.codes.shape)}, scales {tuple(self.scales.shape)} "
                f"(expected {expected})"
            )
        if self.zeros.shape != self.scales.shape:
            raise ConfigError(f"zeros {tuple(self.zeros.shape)} must match scales {tuple(self.scales.shape)}")
        if self.channel_scales is not None and tuple(self.channel_scales.shape) != (rows,):
            raise ConfigError(f"channel_scales {tuple(self.channel_scales.shape)} must be [out] = ({rows},)")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self) -> Tensor:
        """LongTensor [in]: the scale/zero column used by each input column."""
        cols = self.codes.shape[1]
        return torch.arange(cols, device=self.codes.device) // (self.group_size or cols)

    def dequantize(self) -> Tensor:
        """The float32 [out, in] matrix these codes stand for."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.group_size)


def quant_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T) in float64: the layer-output error GPTQ minimises (H = sum of x x^T)."""
    D = W.detach().to(torch.float64) - Wq.detach().to(torch.float64)
    return float(((D @ H.detach().to(torch.float64)) * D).sum())


def activation_codes(x: Tensor, bits: int, planar: int = 1) -> tuple[Tensor, Tensor]:
    """Dynamic per-token symmetric codes of x (last dim) -> (codes float32 in [-qmax, qmax], scale [..., 1]).

    planar > 1 (x 2-D, columns a multiple of it): the same codes with the columns in planar order,
    x[:, j * planar + i] at column i * (K / planar) + j: the order of the kernels' planar weights,
    written by the division itself at no extra pass.

    The one definition of the activation grid: the fake-quant reference and the integer kernels both
    call it, so they see the same integer codes. The input is upcast to float32 first (exact for
    bf16/fp16): a mixed-dtype division measured 8x slower than the upcast plus a float32 division
    (12 ms against 1.4 ms at 1024 x 3072 bf16, 2 threads). max|x| is max(max x, -min x): two reductions
    that write nothing, where abs + amax writes the |x| tensor first (0.8 against 1.4 ms; `aminmax`
    and `vector_norm(x, inf)` measured slower still).
    No clamp is needed: |x| <= amax and scale = fl(amax / qmax) (or larger, when amax < 1e-12) give
    |x / scale| <= qmax * (1 + 2**-23), which rounds to at most qmax; inf / NaN give NaN either way.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
    scale = amax.clamp_(min=1e-12).div_(qmax)
    if planar == 1:  # in place when the upcast made a copy: a fresh [M, K] float32 tensor measured
        # 3x the cost of the division itself (5.8 against 1.7 ms at 1024 x 3072 bf16, its page faults)
        codes = xf.div_(scale) if xf is not x else torch.div(xf, scale)
        return codes.round_(), scale
    rows, cols = xf.shape
    codes = torch.empty(rows, planar, cols // planar, dtype=torch.float32, device=x.device)
    torch.div(xf.view(rows, cols // planar, planar).transpose(1, 2), scale[:, :, None], out=codes)
    return codes.view(rows, cols).round_(), scale


def fake_quant_activation(x: Tensor, act: ActScheme) -> Tensor:
    """Dynamic per-token symmetric fake-quant (last dim): integers in [-qmax, qmax], qmax = 2**(b-1) - 1."""
    if act.bits is None:
        return x
    codes, scale = activation_codes(x, act.bits)
    return codes.mul_(scale).to(x.dtype)
