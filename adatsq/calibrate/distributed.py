"""Data-parallel calibration: each process takes every world-th batch, accumulators are all-reduced.

Launch the same script with `torchrun --nproc-per-node N`; without an initialised process group these
helpers are the identity, so single-process code paths are the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's (global index, item) pairs: round-robin, so seeds stay tied to global indices."""
    rank, size = world()
    return [(i, item) for i, item in enumerate(items) if i % size == rank]


def reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce in place (sum or max) across processes; a no-op in a single process."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
