"""Runtime layers: QuantLinear (packed weights, dequantized on the fly) and TimestepQuantLinear.

QuantLinear buffers (all saved by `state_dict`, so checkpoints round-trip through the constructor):
  qweight uint8 [out, ceil(in*bits/8)] (pack.py layout), scales float16 [out, n_groups],
  zeros uint8 [out, n_groups] (group = column // group_size), bias [out],
  smooth [in], rotation_signs [in], lowrank_a [rank, in], lowrank_b [out, rank] (transforms.py; optional),
  channel_scales float16 [out] (optional: integer group scales, scheme.py; every scale of row r is an
  integer multiple s2 of channel_scales[r] with s2 * (q - z) inside int8, checked here).
Optional buffers that are absent are registered as None and do not appear in the state dict.

`forward` runs the kernel that `kernels.choose_kernel` picks for the input's device and dtype (int8
`_int_mm`, cached dequantized weights, ...), derived from these buffers on the first call and kept
outside the state dict. `reference_forward` is the pure-torch definition every kernel is tested against:
the weight dequantized in the input's dtype on every call, activations fake-quantized per token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adatsq.core.allocator import retain_freed_memory
from adatsq.errors import CheckpointError, PlanError
from adatsq.quant.kernels import compiled, onednn
from adatsq.quant.kernels.dispatch import REFERENCE, KernelPolicy, choose_kernel
from adatsq.quant.kernels.forward import run
from adatsq.quant.kernels.layouts import KernelState, buffers_key, build_state
from adatsq.quant.pack import PackedWeight, packed_cols, unpack
from adatsq.quant.scheme import (
    INT8_MAX,
    WEIGHT_BITS,
    ActScheme,
    QuantizedWeight,
    dequantize_codes,
    fake_quant_activation,
    n_groups,
)
from adatsq.quant.transforms import InputTransform


def _check_shape(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise CheckpointError(
            f"quantized layer tensor {name!r} has shape {tuple(t.shape)}, expected {shape}; "
            f"the checkpoint does not match its config (re-export it)"
        )


def _check_integer_group_scales(scales: Tensor, channel: Tensor, zeros: Tensor, bits: int) -> None:
    """Integer group scales must be what the int8 kernels assume: s2 = scale / s1 a whole number >= 1
    with s2 * |q - z| <= 127 for every code q of the row's grid (else those kernels would wrap)."""
    s2 = scales.float() / channel.float()[:, None]
    reach = torch.maximum(zeros.float(), (2**bits - 1) - zeros.float())
    if not bool(((s2 == s2.round()) & (s2 >= 1) & (s2 * reach <= INT8_MAX)).all()):
        raise CheckpointError(
            "quantized layer's scales are not small integer multiples of its channel_scales (with "
            "s2 * (q - z) inside int8); the checkpoint was edited or written by another tool: re-run quantize"
        )


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored as packed `bits`-bit codes with group-wise scales."""

    def __init__(
        self,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor,
        bias: Tensor | None,
        bits: int,
        group_size: int | None,
        in_features: int,
        act: ActScheme,
        *,
        smooth: Tensor | None = None,
        rotation_signs: Tensor | None = None,
        lowrank_a: Tensor | None = None,
        lowrank_b: Tensor | None = None,
        channel_scales: Tensor | None = None,
    ) -> None:
        super().__init__()
        if bits not in WEIGHT_BITS:
            raise CheckpointError(f"bits={bits!r} is not supported; allowed values: {WEIGHT_BITS}")
        out_features = qweight.shape[0]
        groups = (out_features, n_groups(in_features, group_size))
        _check_shape("qweight", qweight, (out_features, packed_cols(in_features, bits)))
        _check_shape("scales", scales, groups)
        _check_shape("zeros", zeros, groups)
        _check_shape("bias", bias, (out_features,))
        _check_shape("smooth", smooth, (in_features,))
        _check_shape("rotation_signs", rotation_signs, (in_features,))
        _check_shape("channel_scales", channel_scales, (out_features,))
        if (lowrank_a is None) != (lowrank_b is None):
            raise CheckpointError("lowrank_a and lowrank_b must both be present or both absent")
        if lowrank_a is not None:
            _check_shape("lowrank_a", lowrank_a, (lowrank_a.shape[0], in_features))
            _check_shape("lowrank_b", lowrank_b, (out_features, lowrank_a.shape[0]))
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.act = bits, group_size, act
        self.register_buffer("qweight", qweight.to(torch.uint8))
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("zeros", zeros.to(torch.uint8))
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth)
        self.register_buffer("rotation_signs", rotation_signs)
        self.register_buffer("lowrank_a", lowrank_a)
        self.register_buffer("lowrank_b", lowrank_b)
        self.register_buffer(
            "channel_scales", None if channel_scales is None else channel_scales.to(torch.float16)
        )
        if self.channel_scales is not None:
            _check_integer_group_scales(self.scales, self.channel_scales, self.zeros, bits)
        self.kernel_policy = KernelPolicy()
        self._kernel_state: KernelState | None = None
        self._last_kernel: str | None = None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight | PackedWeight,
        bias: Tensor | None,
        act: ActScheme,
        dtype: torch.dtype = torch.float32,
        transform: InputTransform | None = None,
    ) -> QuantLinear:
        """Pack a QuantizedWeight (a packed one is used as is); bias and transform tensors in `dtype`."""
        t = transform or InputTransform()
        packed = qw if isinstance(qw, PackedWeight) else PackedWeight.of(qw)

        def cast(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach().to(dtype).clone()

        return cls(
            packed.qweight,
            packed.scales,
            packed.zeros,
            cast(bias),
            packed.bits,
            packed.group_size,
            packed.in_features,
            act,
            smooth=cast(t.smooth),
            rotation_signs=cast(t.rotation_signs),
            lowrank_a=cast(t.lowrank_a),
            lowrank_b=cast(t.lowrank_b),
            channel_scales=packed.channel_scales,
        )

    @property
    def transform(self) -> InputTransform:
        return InputTransform(self.smooth, self.rotation_signs, self.lowrank_a, self.lowrank_b)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] weight the quantized path multiplies by (in the transformed input basis)."""
        codes = unpack(self.qweight, self.bits, self.in_features)
        return dequantize_codes(codes, self.scales, self.zeros, self.group_size, dtype)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The definition of the layer's function: what every kernel must reproduce."""
        x = self.transform.apply(x)
        y_lowrank = None
        if self.lowrank_a is not None:  # full precision branch on the unquantized transformed input
            y_lowrank = F.linear(F.linear(x, self.lowrank_a.to(x.dtype)), self.lowrank_b.to(x.dtype))
        x = fake_quant_activation(x, self.act)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.dequantized_weight(x.dtype), bias)
        return y if y_lowrank is None else y + y_lowrank

    def kernel_for(self, device_type: str, dtype: torch.dtype) -> str:
        """The kernel an input on `device_type` in `dtype` would run (a pure function of the scheme)."""
        scheme = (self.bits, self.group_size, self.in_features, self.act.bits)
        fast = device_type == "cpu" and onednn.available()
        integer_groups = self.channel_scales is not None
        return choose_kernel(
            *scheme,
            device_type,
            dtype,
            self.kernel_policy,
            onednn_available=fast,
            integer_groups=integer_groups,
        )

    @property
    def kernel(self) -> str:
        """The kernel of the last call; before any call, the one a float32 input on this device would run."""
        return self._last_kernel or self.kernel_for(self.qweight.device.type, torch.float32)

    def prepare(self, dtype: torch.dtype) -> str:
        """Derive the kernel layout for `dtype` inputs on this device now (not on the first call)."""
        self._state(self.qweight.device, dtype)
        return self.kernel

    def _state(self, device: torch.device, dtype: torch.dtype) -> KernelState | None:
        name = self.kernel_for(device.type, dtype)
        self._last_kernel = name
        if name == REFERENCE:
            return None
        key = (name, device, dtype, buffers_key(self))
        if self._kernel_state is None or self._kernel_state.key != key:
            self._kernel_state = None  # free the stale layout before building the new one
            self._kernel_state = build_state(self, name, key, dtype)
        return self._kernel_state

    def forward(self, x: Tensor) -> Tensor:
        state = self._state(x.device, x.dtype)
        return self.reference_forward(x) if state is None else run(self, state, x)

    def __getstate__(self) -> dict:
        """Copies drop the derived kernel layout (rebuilt on the next call): oneDNN's prepacked weight is
        an opaque tensor that `copy.deepcopy` cannot copy, and a copy should not share it anyway."""
        return {**self.__dict__, "_kernel_state": None}

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        """`.to(device/dtype)`: layouts are rebuilt on the next call, and `scales` stay float16.

        `model.to(torch.bfloat16)` then runs bias and transforms in bf16 while the quantization grid
        (the checkpoint's float16 scales) stays exact: re-rounding scales to bf16 would change the weights.
        """
        self._kernel_state = None
        grid = {name: getattr(self, name) for name in ("scales", "channel_scales")}
        out = super()._apply(fn, recurse)
        for name, before in grid.items():
            after = getattr(self, name)
            if after is not None and after.dtype != torch.float16:
                setattr(self, name, before.to(device=after.device))
        return out

    def extra_repr(self) -> str:
        extras = [n for n in ("smooth", "rotation_signs", "lowrank_a") if getattr(self, n) is not None]
        integer = ", integer_group_scales=True" if self.channel_scales is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}{integer}, act_bits={self.act.bits}"
            + (f", transforms={extras}" if extras else "")
        )


class TimestepQuantLinear(nn.Module):
    """One QuantLinear per distinct bit-width of a plan row; `set_segment` picks the one that runs.

    `variants` is an iterable of QuantLinear or a mapping bits -> QuantLinear.

    variants["w{bits}"] holds each variant; segment_bits[i] is the bit-width used in timestep segment i.
    Replacing an entry of `variants` after construction is not supported (the segment table holds refs).
    """

    def __init__(
        self, variants: Iterable[QuantLinear] | Mapping[int, QuantLinear], segment_bits: Sequence[int]
    ) -> None:
        super().__init__()
        if isinstance(variants, Mapping):
            wrong = {k: v.bits for k, v in variants.items() if k != v.bits}
            if wrong:
                raise PlanError(f"variants keyed by the wrong bit-width (key: bits): {wrong}")
            variants = variants.values()
        by_bits: dict[int, QuantLinear] = {}
        for v in variants:
            if v.bits in by_bits:
                raise PlanError(f"two {v.bits}-bit variants given; need one per distinct bit-width")
            by_bits[v.bits] = v
        segment_bits = tuple(int(b) for b in segment_bits)
        if not segment_bits or set(segment_bits) != set(by_bits):
            raise PlanError(
                f"segment bits {segment_bits} must use exactly the variants' bit-widths {sorted(by_bits)}"
            )
        shapes = {(v.in_features, v.out_features) for v in by_bits.values()}
        if len(shapes) != 1:
            raise PlanError(f"variants disagree on (in_features, out_features): {sorted(shapes)}")
        (self.in_features, self.out_features) = shapes.pop()
        self.variants = nn.ModuleDict({f"w{b}": by_bits[b] for b in sorted(by_bits)})
        self.segment_bits = segment_bits
        # plain tuple (not a registered submodule): set_segment is one int assignment, forward one lookup
        self._segment_variants = tuple(self.variants[f"w{b}"] for b in segment_bits)
        self.active_segment = 0

    @property
    def active_bits(self) -> int:
        return self.segment_bits[self.active_segment]

    def set_segment(self, index: int) -> None:
        if not 0 <= index < len(self.segment_bits):
            n = len(self.segment_bits)
            raise PlanError(f"segment {index} does not exist; the layer has {n} segments (0..{n - 1})")
        self.active_segment = index

    def forward(self, x: Tensor) -> Tensor:
        return self._segment_variants[self.active_segment](x)

    @property
    def kernel(self) -> str:
        """The active variant's kernel (each variant keeps its own layout, so switching costs nothing)."""
        return self._segment_variants[self.active_segment].kernel

    @property
    def kernels(self) -> dict[int, str]:
        return {v.bits: v.kernel for v in self.variants.values()}

    def prepare(self, dtype: torch.dtype) -> dict[int, str]:
        """Derive every variant's kernel layout now, so no segment pays for it on its first step."""
        return {v.bits: v.prepare(dtype) for v in self.variants.values()}

    def extra_repr(self) -> str:
        return f"segment_bits={self.segment_bits}, active_segment={self.active_segment}"


def set_kernel_policy(model: nn.Module, policy: KernelPolicy) -> int:
    """Give every QuantLinear of `model` the policy (layouts rebuild on next call); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.kernel_policy = policy
        m._kernel_state = None
    return len(layers)


def prepare_kernels(model: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """Derive every quantized layer's kernel layout for `dtype` inputs now (at load), and compile the
    activation quantization where a layer's policy asks for it; name -> kernel.

    Also keeps glibc from returning freed memory to the OS (`core/allocator.py`; the kernels' per-call
    tensors otherwise fault their pages in again every call; ADATSQ_ALLOCATOR=system opts out)."""
    retain_freed_memory()
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, TimestepQuantLinear):
            m.prepare(dtype)
            out[name] = ", ".join(f"w{b}: {k}" for b, k in m.kernels.items())
        elif isinstance(m, QuantLinear) and not any(name.startswith(f"{p}.") for p in out):
            out[name] = m.prepare(dtype)
    layers = [(m, m._kernel_state) for m in model.modules() if isinstance(m, QuantLinear)]
    codes = any(s is not None and s.compiled_codes for _, s in layers)
    fake_bits = sorted({m.act.bits for m, s in layers if s is not None and s.compiled_fake})
    if codes or fake_bits:
        compiled.warm_up(dtype, codes, fake_bits)
    return out
