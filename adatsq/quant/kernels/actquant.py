"""Per-token activation quantization for the kernels, computed once per input tensor.

Layers that read the same tensor (q / k / v, Flux's single-block q / k / v / proj_mlp, Z-Image's w1 / w3)
would each quantize it again: the result for the last input is kept per kind (int8 codes, or the
fake-quantized tensor of the simulated paths), keyed by the tensor's identity and version, reused
while that tensor is alive and unchanged, and freed with it. On the CPU, int8 codes of long inputs are
computed in row chunks of about QUANT_ELEMENTS values, so the float32 intermediates stay in cache.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adatsq.quant.kernels.compiled import fake_quantized as compiled_fake
from adatsq.quant.kernels.compiled import int8_codes as compiled_codes
from adatsq.quant.scheme import ActScheme, activation_codes, fake_quant_activation

QUANT_ELEMENTS = 1 << 20


class _LastInputs(threading.local):
    def __init__(self) -> None:
        self.by_kind: dict[Any, tuple[weakref.ref, int, Any]] = {}


_last = _LastInputs()


def _shared(x: Tensor, kind: Any, compute: Callable[[Tensor], Any]) -> Any:
    """compute(x), or its result for this very tensor when it is still alive and unedited.

    Inference-mode tensors keep no version counter, so an in-place edit could not be seen: their
    results are never reused.
    """
    if x.is_inference():
        return compute(x)
    kept = _last.by_kind.get(kind)
    if kept is not None and kept[0]() is x and kept[1] == x._version:
        return kept[2]
    value = compute(x)
    kept_here = _last.by_kind

    def forget(ref: weakref.ref) -> None:  # x is gone: free its result now, not at the next call
        if kept_here.get(kind, (None,))[0] is ref:
            del kept_here[kind]

    kept_here[kind] = (weakref.ref(x, forget), x._version, value)
    return value


def int8_codes(x: Tensor, planar: int = 1, compiled: bool = False) -> tuple[Tensor, Tensor]:
    """(int8 codes [M, K], float32 scales [M, 1]) of x's rows: `activation_codes(x, 8, planar)`.

    compiled (`KernelState.compiled_codes`): by the torch.compile'd loop (compiled.py), the same
    values, so shared with eager results; planar codes stay eager, where the division writes their
    order at no cost.
    """
    if compiled and planar == 1:
        return _shared(x, ("int8", planar), lambda t: compiled_codes(t.reshape(-1, t.shape[-1])))
    return _shared(x, ("int8", planar), lambda t: _int8_codes(t, planar))


def fake_quantized(x: Tensor, act: ActScheme, compiled: bool = False) -> Tensor:
    """`fake_quant_activation(x, act)`, shared between the layers that read x; compiled: by the
    torch.compile'd loop (compiled.py), the same values, so shared with eager results."""
    if act.bits is None:
        return x
    key = ("fake", act.bits)
    if compiled:
        return _shared(x, key, lambda t: compiled_fake(t.reshape(-1, t.shape[-1]), act.bits).view_as(t))
    return _shared(x, key, lambda t: fake_quant_activation(t, act))


def _int8_codes(x: Tensor, planar: int) -> tuple[Tensor, Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, QUANT_ELEMENTS // rows.shape[1]) if x.device.type == "cpu" else rows.shape[0]
    if rows.shape[0] <= step:
        codes, scale = activation_codes(rows, 8, planar)
        return codes.to(torch.int8), scale
    codes = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    for start in range(0, rows.shape[0], step):
        chunk_codes, chunk_scale = activation_codes(rows[start : start + step], 8, planar)
        codes[start : start + step] = chunk_codes
        scale[start : start + step] = chunk_scale
    return codes, scale
