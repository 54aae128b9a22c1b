"""Calibration that survives interruption: partial XᵀX sums are saved every so often and picked up again.

The file is keyed by everything that determines the sums (layers, segments, inputs, batching, seed,
process rank), so a changed recipe or calibration set starts afresh instead of mixing statistics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from adatsq.calibrate.capture import LayerStats, distinct
from adatsq.calibrate.segments import SegmentMap
from adatsq.core.io import atomic_write

log = logging.getLogger(__name__)
FIELDS = ("xtx", "tokens", "absmax")


def progress_key(
    layers: dict[str, nn.Linear],
    segments: SegmentMap,
    inputs: Sequence[Any],
    batch_size: int,
    seed: int,
    rank: int,
) -> str:
    text = repr(
        (
            [(n, m.in_features, m.out_features) for n, m in layers.items()],
            segments.step_ranges,
            segments.timesteps,
            [repr(x) for x in inputs],
            batch_size,
            seed,
            rank,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()


def save_progress(path: Path, stats: dict[str, LayerStats], done: int, key: str) -> None:
    """Atomically write the partial sums after `done` batches of this process's shard."""
    tensors = {
        f"{name}::{f}": getattr(st, f).detach().cpu().contiguous()
        for name, st in distinct(stats).items()
        for f in FIELDS
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key, "done": str(done)}))


def load_progress(path: Path, stats: dict[str, LayerStats], key: str) -> int:
    """Fill `stats` from `path` and return how many batches it covers; 0 if absent or for other settings."""
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.warning("ignoring %s: it was written for other calibration settings", path)
                return 0
            for name, st in distinct(stats).items():
                for field in FIELDS:
                    getattr(st, field).copy_(f.get_tensor(f"{name}::{field}"))
            done = int(meta["done"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable calibration progress %s (%s)", path, err)
        for st in stats.values():
            for field in FIELDS:
                getattr(st, field).zero_()
        return 0
    log.info("resuming calibration from %s after %d batches", path, done)
    return done
