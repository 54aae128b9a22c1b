"""The tensor files of a checkpoint: one `model.safetensors`, or shards with an index when it is large.

Shards follow diffusers / transformers naming (`model-00001-of-00003.safetensors` + the index
`model.safetensors.index.json` with `weight_map`), so their loaders read them too. The index also
records each shard's sha256: a missing shard, or one left from another run, is refused by name.
Reading is lazy: `TensorFiles.get` maps one tensor at a time, so loading never holds every tensor at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adatsq.checkpoint.format import SAFETENSORS_ERRORS, WEIGHTS, locate
from adatsq.core.io import atomic_write, write_json
from adatsq.errors import CheckpointError

INDEX = "model.safetensors.index.json"
# file stems: transformers' (and adatsq's format 1) "model", diffusers models' "diffusion_pytorch_model"
STEMS = ("model", "diffusion_pytorch_model")
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F32": 4,
    "I32": 4,
    "F64": 8,
    "I64": 8,
}
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
    "I16": torch.int16, "F32": torch.float32, "I32": torch.int32, "F64": torch.float64, "I64": torch.int64,
}  # fmt: skip
_SHARD = re.compile(r"(?:model|diffusion_pytorch_model)-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD = "10GB"  # diffusers' save_pretrained default
# One key only: safetensors writes `__metadata__` from a Rust HashMap, in a random order each call, so a
# second key would make the header bytes differ between runs of the same seed. Readers ignore it.
METADATA = {"format": "pt"}


def shard_name(index: int, count: int, stem: str = "model") -> str:
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


def weights_name(stem: str = "model") -> str:
    return f"{stem}.safetensors"


def index_name(stem: str = "model") -> str:
    return f"{stem}.safetensors.index.json"


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Keys in sorted order, cut into consecutive groups of at most `max_bytes` (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def _stored_spans(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (start, end) byte offsets of each tensor's data in a safetensors file, from its header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    begin = 8 + length
    return {
        key: (begin + info["data_offsets"][0], begin + info["data_offsets"][1])
        for key, info in header.items()
        if key != "__metadata__"
    }


def _differs(data: memoryview, expected: str | None) -> bool:
    return expected is not None and hashlib.sha256(data).hexdigest() != expected


def write_tensors(
    directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, stem: str = "model"
) -> int:
    """Write `tensors` into `directory` (one `{stem}.safetensors`, or shards + index); returns the bytes
    written."""
    groups = _split(tensors, max_shard_bytes)
    if len(groups) == 1:
        _save(tensors, directory / weights_name(stem))
        return (directory / weights_name(stem)).stat().st_size
    weight_map, hashes, total = {}, {}, 0
    for i, keys in enumerate(groups, 1):
        name = shard_name(i, len(groups), stem)
        _save({k: tensors[k] for k in keys}, directory / name)
        weight_map.update(dict.fromkeys(keys, name))
        hashes[name] = file_sha256(directory / name)
        total += (directory / name).stat().st_size
    index = {"metadata": {"total_size": total, "sha256": hashes}, "weight_map": weight_map}
    write_json(directory / index_name(stem), index)
    return total


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=METADATA))


class TensorFiles:
    """Lazy, validated access to the tensors of a checkpoint folder (single file or shard set)."""

    def __init__(self, directory: Path, verify: bool = True) -> None:
        self.directory = directory
        self._handles: dict[str, Any] = {}
        stem = next((s for s in STEMS if (directory / index_name(s)).is_file()), None)
        self.index = index_name(stem or "model")
        # every shard file already matched its sha256 in the index: its tensors' bytes are checked too
        self.files_verified = verify and stem is not None
        single = next((weights_name(s) for s in STEMS if (directory / weights_name(s)).is_file()), None)
        if stem is not None:
            self.weight_map = self._read_index(verify)
        elif single is not None:
            with self._open(single) as f:
                self.weight_map = dict.fromkeys(f.keys(), single)
        else:
            raise CheckpointError(
                f"{directory / WEIGHTS} is missing (a diffusers component's: {weights_name(STEMS[1])}); "
                "the checkpoint is incomplete: re-run quantize"
            )

    def _read_index(self, verify: bool) -> dict[str, str]:
        path = self.directory / self.index
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            weight_map, hashes = index["weight_map"], index["metadata"]["sha256"]
        except (
            ValueError,
            KeyError,
            TypeError,
        ) as err:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise CheckpointError(
                f"{path} is corrupted ({type(err).__name__}: {err}); re-run quantize"
            ) from None
        names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        if not all(isinstance(n, str) and _SHARD.fullmatch(n) for n in names) or not isinstance(hashes, dict):
            raise CheckpointError(
                f"{path} is corrupted: weight_map must map tensor keys to shard files named like "
                f"{shard_name(1, 2)} and metadata.sha256 map them to hashes; re-run quantize"
            )
        for name in sorted(set(weight_map.values())):
            shard = self.directory / name
            if not shard.is_file():
                raise CheckpointError(
                    f"shard {shard} is missing; the checkpoint is incomplete: re-run quantize"
                )
            if verify and file_sha256(shard) != hashes.get(name):
                raise CheckpointError(
                    f"shard {shard} does not belong to this checkpoint (its sha256 differs from "
                    f"{self.index}): it was left by another run or damaged; re-run quantize"
                )
        return weight_map

    def _open(self, name: str) -> Any:
        path = self.directory / name
        try:
            return safe_open(str(path), framework="pt")
        except SAFETENSORS_ERRORS as err:
            raise CheckpointError(f"{path} is truncated or corrupted ({err}); re-run quantize") from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = self._open(name)
        try:
            return self._handles[name].get_tensor(key)
        except SAFETENSORS_ERRORS as err:
            raise CheckpointError(f"{self.directory / name} is truncated or corrupted ({err})") from None

    def specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """key -> (safetensors dtype, shape) of every tensor, from the headers only (no data is read)."""
        specs = {}
        for key, name in self.weight_map.items():
            if name not in self._handles:
                self._handles[name] = self._open(name)
            try:
                view = self._handles[name].get_slice(key)
            except SAFETENSORS_ERRORS:
                raise CheckpointError(
                    f"{self.directory / name} does not hold tensor {key!r} that {self.index} maps to it; "
                    "the checkpoint is incomplete or mixed: re-run quantize"
                ) from None
            specs[key] = (view.get_dtype(), tuple(view.get_shape()))
        return specs

    def sizes(self) -> dict[str, int]:
        """Stored bytes of every tensor, from the safetensors headers only."""
        return {
            key: math.prod(shape) * DTYPE_BYTES.get(dtype, 0) for key, (dtype, shape) in self.specs().items()
        }

    def verify_checksums(self, expected: dict[str, str]) -> None:
        """Hash every tensor's stored bytes and compare with `expected` (the config's "checksums")."""
        for name in sorted(set(self.weight_map.values())):
            path = self.directory / name
            try:
                spans = _stored_spans(path)
            except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
                raise CheckpointError(f"{path} is truncated or corrupted ({err}); re-run quantize") from None
            # slices of a memoryview copy nothing
            with (
                path.open("rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
                memoryview(data) as view,
            ):
                bad = [k for k, (a, b) in spans.items() if _differs(view[a:b], expected.get(k))]
            if bad:
                raise CheckpointError(
                    f"tensor {bad[0]!r} in {path} is damaged: its sha256 differs from the one in its config; "
                    "re-download the checkpoint or re-run quantize (verify=False skips the check)"
                )

    def files(self) -> Iterator[Path]:
        for name in sorted(set(self.weight_map.values())):
            yield self.directory / name

    def nbytes(self) -> int:
        """Bytes on disk of every tensor file."""
        return sum(path.stat().st_size for path in self.files())


def tensor_files(directory: Path) -> list[Path]:
    """Every tensor file of a checkpoint folder of either format (one file, or its shards)."""
    return list(TensorFiles(locate(Path(directory)).tensors, verify=False).files())
