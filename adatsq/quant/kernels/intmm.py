"""`torch._int_mm` with the padding its device needs: never an error, never a silently wrong shape.

CUDA's `_int_mm` needs M > 16 and K, N multiples of 8; the CPU kernel takes any shape (checked
exactly in the tests). Padding with zero rows / columns leaves the integer products unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class IntMMRules:
    """Shape constraints of `torch._int_mm` on one device type."""

    min_rows: int = 1  # M must be at least this
    multiple: int = 1  # K and N must be multiples of this


_RULES = {"cuda": IntMMRules(min_rows=17, multiple=8)}


def int_mm_rules(device_type: str) -> IntMMRules:
    return _RULES.get(device_type, IntMMRules())


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_weight(w: Tensor, rules: IntMMRules) -> Tensor:
    """int8 [N, K] -> [N', K'] zero-padded to the rules' multiple (done once per layout)."""
    n, k = w.shape
    dn, dk = pad_to(n, rules.multiple) - n, pad_to(k, rules.multiple) - k
    return F.pad(w, (0, dk, 0, dn)) if dn or dk else w


def int8_matmul(a: Tensor, w: Tensor, n_out: int, rules: IntMMRules, out: Tensor | None = None) -> Tensor:
    """int8 a [M, K] @ padded int8 w [N', K'].T -> exact int32 [M, n_out]; into `out` (int32 [M, n_out])
    when no padding is needed."""
    m, k = a.shape
    dm, dk = max(rules.min_rows - m, 0), w.shape[1] - k
    if dm or dk:
        a = F.pad(a, (0, dk, 0, dm))
    if out is not None and not (dm or w.shape[0] != n_out):
        return torch._int_mm(a, w.t(), out=out)
    acc = torch._int_mm(a, w.t())
    return acc[:m, :n_out] if dm or acc.shape[1] != n_out else acc
