"""Several processes (`torchrun --nproc-per-node N`): recording is split by batch, passes by owner rank.

Without an initialised process group these helpers are the identity, so single-process code paths are
the same code. Work is split so that every number is computed by the same operations in the same order
whatever the world size: a rank records its share of the calibration batches (seeded by global batch
index), every rank then holds the whole recording, and each pass over a group of layers is replayed and
solved by one owner rank only. Results are exchanged, never summed across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from adatsq.errors import ConfigError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Only rank 0 writes outputs: the others hold the same results."""
    return world()[0] == 0


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's (global index, item) pairs: round-robin, so seeds stay tied to global indices."""
    rank, size = world()
    return [(i, item) for i, item in enumerate(items) if i % size == rank]


def owned(count: int) -> list[int]:
    """The indices of `count` work units this rank owns (round-robin)."""
    rank, size = world()
    return [i for i in range(count) if i % size == rank]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] in a single process)."""
    if world()[1] == 1:
        return [value]
    values: list[Any] = [None] * world()[1]
    dist.all_gather_object(values, value)
    return values


def merge_owned(*parts: dict[Any, Any]) -> tuple[dict[Any, Any], ...]:
    """Dicts keyed by owned units (layers, batches), each rank holding its own keys: the union on every
    rank."""
    gathered = gather(parts)
    if len(gathered) == 1:
        return parts
    merged: tuple[dict[Any, Any], ...] = tuple({} for _ in parts)
    for rank_parts in gathered:
        for whole, mine in zip(merged, rank_parts, strict=True):
            whole.update(mine)
    return merged


def reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce in place (sum or max) across processes; a no-op in a single process."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def launched_size() -> int:
    """The world size torchrun announced in the environment (1 when not launched by it)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} is not a positive integer; launch with torchrun")
    return int(text)


def init_from_environment(device: str | None) -> str | None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); return this rank's device.

    `--devices N` style checks belong to the caller; here only the launch itself is read.
    """
    if launched_size() == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = device is not None and device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def finish() -> None:
    """Leave the process group (the CLI calls this once its command is done)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
