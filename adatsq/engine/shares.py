"""Solved shares of a pass schedule on disk, so a killed run continues after its last finished share.

A share's statistics are never written (they are the big part: the run would write every accumulator);
what it yields is: each layer's packed variants, and for the AdaTSQ candidates its error-table rows and
token count. One safetensors file per share, written atomically once the share is solved, named by a
key of everything that determines it (recipe, layers, inputs, seed, processes, stage, plan), so a
changed run never reads another's results. A resumed run records the sampler once more (its inputs
are not kept on disk) and replays only the shares without a file; the result is byte-identical, since a
share's result depends on nothing but its own replay.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.distributed import world
from adatsq.core.io import atomic_write
from adatsq.engine.passes import ReplayedPasses
from adatsq.engine.solve import Variant
from adatsq.quant.pack import PackedWeight
from adatsq.quant.transforms import TRANSFORM_FIELDS, InputTransform

log = logging.getLogger(__name__)


@dataclass
class LayerResult:
    """What solving one layer of a share produced."""

    variants: dict[int, Variant]
    errors: np.ndarray | None = None  # AdaTSQ candidates: [segments, bits] error-table rows
    tokens: float | None = None  # AdaTSQ candidates: tokens per step per input


ShareResult = dict[str, LayerResult]


def share_store(resume: Path | None, statistics: Iterable[Any], *parts: Any) -> ShareStore | None:
    """The store of a budgeted / multi-process run that may resume (None otherwise): keyed by the
    passes' own key (layers, weights, inputs, seed, budget, processes) and `parts` (stage, recipe, plan)."""
    if resume is None or not isinstance(statistics, ReplayedPasses):
        return None
    return ShareStore(resume, hashlib.sha256(repr((statistics.key, *parts)).encode()).hexdigest()[:20])


class ShareStore:
    """Files `<resume>.<key>.share-<k>.safetensors` (`resume` without its suffix) beside the output."""

    def __init__(self, resume: Path, key: str) -> None:
        self.prefix, self.key = resume.with_suffix(""), key

    def path(self, index: int) -> Path:
        return self.prefix.parent / f"{self.prefix.name}.{self.key}.share-{index:05d}.safetensors"

    def save(self, index: int, result: ShareResult) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for name, layer in result.items():
            entry: dict[str, Any] = {"variants": {}}
            for bits, v in layer.variants.items():
                w, t = v.weight, v.transform
                prefix = f"{name}/{bits}/"
                tensors.update(
                    {prefix + "qweight": w.qweight, prefix + "scales": w.scales, prefix + "zeros": w.zeros}
                )
                if w.channel_scales is not None:
                    tensors[prefix + "channel_scales"] = w.channel_scales
                for f in TRANSFORM_FIELDS:
                    if getattr(t, f) is not None:
                        tensors[prefix + f] = getattr(t, f)
                entry["variants"][str(bits)] = {
                    "group_size": w.group_size,
                    "in_features": w.in_features,
                    "info": v.info,
                }
            if layer.errors is not None:
                entry["errors"] = layer.errors.tolist()  # json floats round-trip exactly
            if layer.tokens is not None:
                entry["tokens"] = layer.tokens
            meta[name] = entry
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        header = {"key": self.key, "layers": json.dumps(meta)}
        atomic_write(self.path(index), lambda tmp: save_file(tensors, tmp, metadata=header))

    def load(self, index: int) -> ShareResult | None:
        """The share's result from an earlier run, or None (absent, unreadable or another run's)."""
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("key") != self.key:
                    return None
                return {name: _layer(f, name, entry) for name, entry in json.loads(header["layers"]).items()}
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable share %s (%s); solving it again", path, err)
            return None


def clear_shares(resume: Path) -> None:
    """Remove every share file of this output (any key): called once the output is written."""
    prefix = resume.with_suffix("")
    for path in prefix.parent.glob(f"{prefix.name}.*.share-*.safetensors"):
        path.unlink(missing_ok=True)


def _layer(f: Any, name: str, entry: dict[str, Any]) -> LayerResult:
    variants = {}
    keys = set(f.keys())
    for bits_text, v in entry["variants"].items():
        prefix, bits = f"{name}/{bits_text}/", int(bits_text)
        weight = PackedWeight(
            f.get_tensor(prefix + "qweight"),
            f.get_tensor(prefix + "scales"),
            f.get_tensor(prefix + "zeros"),
            bits,
            v["group_size"],
            v["in_features"],
            f.get_tensor(prefix + "channel_scales") if prefix + "channel_scales" in keys else None,
        )
        transform = InputTransform(
            **{t: f.get_tensor(prefix + t) if prefix + t in keys else None for t in TRANSFORM_FIELDS}
        )
        variants[bits] = Variant(weight, transform, v["info"])
    errors = np.array(entry["errors"], dtype=np.float64) if "errors" in entry else None
    return LayerResult(variants, errors, entry.get("tokens"))


def solved_shares(
    statistics: Iterable[dict[str, LayerStats | None]],
    solve: Callable[[dict[str, LayerStats | None]], ShareResult],
    store: ShareStore | None,
) -> Iterator[ShareResult]:
    """`solve` on each group of statistics (each group dropped before the next is captured); with a
    store (record / replay passes), a share an earlier run finished is read back instead."""
    if store is None or not isinstance(statistics, ReplayedPasses):
        for group in statistics:
            yield solve(group)
            del group
        return
    if world()[1] > 1:
        statistics.recording  # noqa: B018 — recording is collective: every rank takes part, resumed or not
    for index in range(len(statistics.shares)):
        result = store.load(index)
        if result is None:
            result = solve(statistics.capture(index))
            store.save(index, result)
        else:
            log.info("share %d: read back from %s", index, store.path(index))
        yield result
