"""Per-thread scratch matrices the per-call kernels write their weights into, reused by every layer."""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype, str], Tensor] = {}


_scratch = _Scratch()


def scratch_matrix(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device, use: str = "weight"
) -> Tensor:
    """A [rows, cols] tensor from one buffer per thread, device, dtype and `use` (tensors that are live
    together take different uses), grown to the widest layer and reused by every layer's call (so valid
    only until the call that asked for it returns).

    A fresh [N, K] weight per call cost more than computing it: 18 ms against 2.5 ms of unpacking at
    3072 -> 12288 on 2 threads (EPYC Zen 5), the page faults of first touching 38 MB every call
    (allocations past glibc's 32 MB mmap threshold are never reused).
    """
    key = (device, dtype, use)
    buffer = _scratch.buffers.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffer = torch.empty(rows * cols, dtype=dtype, device=device)
        _scratch.buffers[key] = buffer
    return buffer[: rows * cols].view(rows, cols)


def clear() -> None:
    """Free this thread's buffers."""
    _scratch.buffers.clear()


def buffer(device: torch.device, dtype: torch.dtype, use: str = "weight") -> Tensor | None:
    """This thread's buffer for (device, dtype, use), if one was made."""
    return _scratch.buffers.get((device, dtype, use))
