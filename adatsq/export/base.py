"""What every export target shares: the segment selection, the layers it exports, the exporter registry.

No peer format has a timestep axis. An export therefore keeps ONE variant per layer: the one the model
runs at a chosen timestep segment (`--segment K`), or each layer's widest (`--max`), and says which.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from adatsq.core.registry import Registry
from adatsq.errors import ConfigError, ExportError

TRANSFORM_BUFFERS = ("smooth", "rotation_signs", "lowrank_a", "lowrank_b")
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Selection:
    """Which variant of each layer is exported: the one used at `segment` (0-based), or the widest (None)."""

    segment: int | None = None

    def __post_init__(self) -> None:
        if self.segment is not None and (isinstance(self.segment, bool) or not isinstance(self.segment, int)):
            raise ConfigError(f"--segment must be an integer, got {self.segment!r}")

    def check(self, num_segments: int, what: str) -> None:
        if self.segment is not None and not 0 <= self.segment < num_segments:
            raise ConfigError(
                f"--segment {self.segment} is out of range: {what} has {num_segments} timestep segment(s), "
                f"so K must be in 0..{num_segments - 1}"
            )

    def pick(self, row: tuple[int, ...]) -> int:
        return max(row) if self.segment is None else row[self.segment]


@dataclass(frozen=True)
class LayerExport:
    """One quantized layer as exported: the chosen variant and what the source says about it."""

    name: str
    bits: int  # the exported variant's weight bits
    row: tuple[int, ...]  # the source's bits per timestep segment
    group_size: int | None  # None = one scale per output channel
    symmetric: bool
    act_bits: int | None  # dynamic per-token activation bits; None = float activations
    in_features: int | None = None  # None when the source is a plan (it stores no shapes)
    out_features: int | None = None
    transforms: tuple[str, ...] = ()  # input-transform buffers stored with the variant
    integer_group_scales: bool = False  # the variant's group scales are per-channel scale x integer


@dataclass
class ExportSource:
    """A checkpoint or plan read for export, with the selection already applied to every layer."""

    kind: Literal["checkpoint", "plan"]
    path: Path
    family: str
    selection: Selection
    selection_text: str  # how the variants were chosen, for the output's config and the summary
    segment_steps: list[list[int]]  # sampler steps [start, end) of each timestep segment
    layers: dict[str, LayerExport]
    recipe: dict[str, Any] | None = None  # the stored recipe (checkpoints only)
    float_linears: tuple[str, ...] = ()  # Linear layers the checkpoint keeps in float (checkpoints only)
    model_config: dict[str, Any] = field(default_factory=dict)  # the denoiser's config.json, when known
    files: Any = None  # the checkpoint's TensorFiles (checkpoints only)
    rest_keys: tuple[str, ...] = ()  # the checkpoint's float tensors, copied as they are

    @property
    def num_segments(self) -> int:
        return len(self.segment_steps)

    def tensor(self, key: str) -> torch.Tensor:
        if self.files is None:
            raise ExportError(f"{self.path} is a plan: it holds no tensors to export")
        return self.files.get(key)


@dataclass(frozen=True)
class ExportOptions:
    """Target-specific choices; each exporter reads the ones it uses."""

    # compressed-tensors weight_scale dtype: float16 keeps adatsq's stored scales byte for byte (and the
    # float16 dequantization equals adatsq's float16 weights); float32 makes the float32 dequantization
    # equal adatsq's float32 weights bit for bit (the same values, upcast exactly)
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"--scale-dtype {self.scale_dtype!r} is not supported; use {list(SCALE_DTYPES)}"
            )


@dataclass(frozen=True)
class Written:
    """What an exporter wrote, for the output's adatsq_export.json and the command's summary line."""

    description: str  # e.g. "compressed-tensors pack-quantized, 2 config groups"
    files: tuple[str, ...]
    keeps: tuple[str, ...]
    loses: tuple[str, ...]


class Exporter(ABC):
    """One target format; `check` refuses what the format cannot hold before anything is written."""

    name: ClassVar[str]
    reads_plans: ClassVar[bool] = False  # config-only targets can export a plan.json as well

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        refuse_transforms(source, self.name)

    @abstractmethod
    def write(self, source: ExportSource, options: ExportOptions, folder: Path) -> Written: ...


EXPORTERS: Registry[type[Exporter]] = Registry("export target")


def refuse_transforms(source: ExportSource, target: str) -> None:
    """Smoothing / rotation / low-rank weights live in a transformed input basis no peer format knows."""
    for layer in source.layers.values():
        if layer.transforms:
            raise ExportError(
                f"layer {layer.name!r} stores input transforms ({', '.join(layer.transforms)}) that {target} "
                "cannot represent; export a checkpoint quantized without `outliers` (smoothing, rotation, "
                "low-rank)"
            )


def integer_scales_lost(source: ExportSource, what_happens: str) -> list[str]:
    """The `loses` line for integer group scales (no peer format has that two-level grid), if used."""
    used = any(layer.integer_group_scales for layer in source.layers.values())
    return [f"integer group scales: {what_happens}"] if used else []


def bits_summary(layers: dict[str, LayerExport]) -> str:
    """'w4 ×5, w8 ×2': how many layers export each bit-width."""
    counts: dict[int, int] = {}
    for layer in layers.values():
        counts[layer.bits] = counts.get(layer.bits, 0) + 1
    return ", ".join(f"w{bits} ×{count}" for bits, count in sorted(counts.items()))
