"""Which kernel a quantized layer runs: a pure function of its scheme, the input's device and dtype.

Rules (measured on the CPU of tools/bench_kernels.py; reports/kernels.md has the numbers):
* int8 activations (A8) with one scale per output channel -> the integer path (int32 accumulate, one
  rescale). 8-bit weights keep a cached int8 copy, on x86 CPUs for oneDNN (AMX / VNNI; prepacked
  where that layout runs a JIT kernel, else plain [K, N]: onednn.py), `torch._int_mm` where oneDNN is
  missing, on CUDA, or with `KernelPolicy(onednn=False)`;
  2-6-bit weights stay packed and are unpacked to int8 for `torch._int_mm` on every call (O(N*K),
  against the O(M*N*K) matmul; oneDNN's prepack costs as much as several matmuls, so not per call).
* A8 with group-wise weights on integer group scales (`WeightScheme(integer_group_scales=True)`) ->
  the same integer paths: s2 * (q - z) is an int8 weight with one scale per output channel.
* A8 with other group-wise weights -> dequantized weights in the activation dtype with fake-quantized
  activations: torch has no int8 matmul that rescales partial sums per K-group, and one `_int_mm`
  per group measured ~6x slower than a single bf16 matmul.
* weight-only (A16) -> weights dequantized once into the activation dtype and cached (the fastest of
  the CPU paths measured: see the report).
* A4 -> simulated (fake-quantized activations over dequantized weights): no 4-bit activation matmul
  exists on these CPUs.
* float64 inputs, other devices, or `KernelPolicy(enabled=False)` -> the pure-torch reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adatsq.errors import ConfigError

REFERENCE = "reference"
INT8_CACHED = "int8-cached"
INT8_ONEDNN = "int8-onednn"
INT8_PER_CALL = "int8-unpack-per-call"
DEQUANT_CACHED = "dequant-cached"
DEQUANT_PER_CALL = "dequant-per-call"
SIMULATED_ACT = "+fake-a"  # suffix (then the bits) of a kernel name whose activations are fake-quantized

KERNELS = {
    REFERENCE: "unpack + dequantize every call, fake-quantized activations (the reference)",
    INT8_CACHED: "int8 activations x cached int8 weights via torch._int_mm, int32 accumulate",
    INT8_ONEDNN: "int8 activations x cached int8 weights in oneDNN's layout (AMX / VNNI), int32 accumulate",
    INT8_PER_CALL: "int8 activations x weights unpacked to int8 per call (weights stay packed)",
    DEQUANT_CACHED: "weights dequantized once into the activation dtype and cached",
    DEQUANT_PER_CALL: "weights dequantized into the activation dtype every call (weights stay packed)",
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class KernelPolicy:
    """Per-layer kernel choices that trade memory for speed.

    enabled: False runs the reference path everywhere (for checks against it).
    cache_int8_low_bits: keep an int8 copy of 2-6-bit weights (1 byte/weight more) instead of
    unpacking them every call; off by default so "W4A8" keeps 4-bit weights in memory (plus one int8
    buffer the size of the widest layer, reused by every layer's unpack, and for integer group scales
    one uint8 buffer at most that size).
    cache_dequant: keep the dequantized weights of A16 / group-wise / A4 layers between calls (False:
    dequantize every call into one buffer the size of the widest layer, reused by every layer).
    onednn: run cached int8 weights through oneDNN on CPUs where it works (False: `torch._int_mm`).
    compiled: quantize CPU activations in torch.compile'd loops, the same values as eager: the integer
    kernels' int8 codes (~2x faster) and the simulated paths' fake-quantization (group-wise A8, A4;
    ~2x); needs a C++ compiler and 10-40 s of compilation per process (compiled.py).
    """

    enabled: bool = True
    cache_int8_low_bits: bool = False
    cache_dequant: bool = True
    onednn: bool = True
    compiled: bool = False

    def __post_init__(self) -> None:
        for name in ("enabled", "cache_int8_low_bits", "cache_dequant", "onednn", "compiled"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"KernelPolicy.{name}={getattr(self, name)!r} must be True or False")


def per_channel(group_size: int | None, in_features: int) -> bool:
    """True when one scale/zero covers a whole row (group_size None or at least in_features)."""
    return group_size is None or group_size >= in_features


def choose_kernel(
    bits: int,
    group_size: int | None,
    in_features: int,
    act_bits: int | None,
    device_type: str,
    dtype: torch.dtype,
    policy: KernelPolicy = KernelPolicy(),
    onednn_available: bool = False,
    integer_groups: bool = False,
) -> str:
    """The kernel name (a key of KERNELS, plus "+fake-a{bits}" when activations are simulated).

    `onednn_available`: whether this machine runs oneDNN's int8 linear (`onednn.available()`); passed
    in so the choice stays a function of its arguments. `integer_groups`: the layer's group scales are
    integer multiples of per-channel ones (its `channel_scales`).
    """
    if not policy.enabled or device_type not in DEVICES or dtype not in FLOAT_DTYPES:
        return REFERENCE
    if act_bits == 8 and (integer_groups or per_channel(group_size, in_features)):
        if not (bits == 8 or policy.cache_int8_low_bits):
            return INT8_PER_CALL
        onednn = device_type == "cpu" and policy.onednn and onednn_available
        return INT8_ONEDNN if onednn else INT8_CACHED
    name = DEQUANT_CACHED if policy.cache_dequant else DEQUANT_PER_CALL
    return name if act_bits is None else f"{name}{SIMULATED_ACT}{act_bits}"
