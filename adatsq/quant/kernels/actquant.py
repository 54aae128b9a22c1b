"""Per-token int8 activation codes for the integer kernels, computed once per input tensor.

Layers that read the same tensor (q / k / v, Flux's single-block q / k / v / proj_mlp, Z-Image's w1 / w3)
would each quantize it again: the codes of the last input are kept, keyed by the tensor's identity and
version, and reused while that tensor is alive and unchanged. On the CPU the codes are computed in row
chunks of about QUANT_ELEMENTS values, so the float32 intermediates stay in cache.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

from adatsq.quant.scheme import activation_codes

QUANT_ELEMENTS = 1 << 18


class _LastInput(threading.local):
    source: weakref.ref | None = None
    version: int = -1
    codes: Tensor | None = None
    scale: Tensor | None = None


_last = _LastInput()


def int8_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes [M, K], float32 scales [M, 1]) of x's rows: `activation_codes(x, 8)`, value for value.

    Inference-mode tensors keep no version counter, so an in-place edit could not be seen: their codes
    are never reused.
    """
    shareable = not x.is_inference()
    if shareable and _last.source is not None and _last.source() is x and _last.version == x._version:
        return _last.codes, _last.scale
    rows = x.reshape(-1, x.shape[-1])
    codes = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    step = max(1, QUANT_ELEMENTS // rows.shape[1]) if x.device.type == "cpu" else rows.shape[0]
    for start in range(0, rows.shape[0], step):
        chunk_codes, chunk_scale = activation_codes(rows[start : start + step], 8)
        codes[start : start + step] = chunk_codes
        scale[start : start + step] = chunk_scale
    if shareable:
        _last.source, _last.version, _last.codes, _last.scale = weakref.ref(x), x._version, codes, scale
    return codes, scale
