"""A test helper: bytes of the tensor storages an operation creates, and their peak (torch dispatch)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still referenced, and their peak (views of
    the `held` tensors, which the caller already holds, are not new storage)."""

    def __init__(self, *held: torch.Tensor) -> None:
        super().__init__()
        self.held = {t.untyped_storage().data_ptr() for t in held}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key in self.held:
                    continue
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [t.untyped_storage().nbytes(), 1]
                    self.current += self.live[key][0]
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, key)
        return out
