"""Sampling settings of a diffusers pipeline and the small JSON file that keeps them beside its weights.

A pipeline folder records its components but not how adatsq should sample it (resolution, guidance,
text length), nor the weights' dtype (diffusers reloads float32 unless told otherwise). Both live in
adatsq_pipeline.json so that a saved base, or a tiny test pipeline, reloads exactly as it was used.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adatsq.core.io import write_json
from adatsq.errors import ConfigError, SamplingError

SETTINGS_FILE = "adatsq_pipeline.json"
SETTINGS_VERSION = 1

# Varied subjects, styles and layouts, so calibration sees more than one kind of activation.
DEFAULT_PROMPTS = (
    "a red fox sitting in fresh snow at sunrise",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with chopsticks, studio photo",
    "a watercolor painting of a lighthouse on a cliff",
    "a cyberpunk street at night with neon signs and rain",
    "a close-up portrait of an old fisherman, black and white",
    "a cozy living room with a fireplace and a sleeping cat",
    "a sign that says 'open late' above a small bakery",
    "an oil painting of sunflowers in a blue vase",
    "a snowy mountain range reflected in a calm lake",
    "a robot reading a book in a library, pixel art",
    "two children flying a kite on a windy beach",
    "a macro photo of a dew drop on a green leaf",
    "an isometric illustration of a tiny island village",
    "a vintage car parked in front of a diner, 1950s",
    "a golden retriever puppy playing in autumn leaves",
    "a futuristic city skyline with flying trains",
    "a plate of colorful macarons on a marble table",
    "a medieval castle in the fog, fantasy concept art",
    "a hummingbird drinking from a red flower",
    "a minimalist logo of a mountain and the sun",
    "a busy market in marrakech, afternoon light",
    "an underwater scene with a sea turtle and coral",
    "a chess board in the middle of a game, shallow depth of field",
)

# Keyword arguments the adapter itself passes to the pipeline; `extra` may not override them.
RESERVED_CALL_KWARGS = frozenset(
    {
        "prompt",
        "class_labels",
        "generator",
        "num_inference_steps",
        "output_type",
        "return_dict",
        "latents",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "guidance_scale",
        "height",
        "width",
        "max_sequence_length",
    }
)


@dataclass(frozen=True)
class DiffusersSampling:
    """How the pipeline samples during calibration and evaluation (None = the pipeline's own default)."""

    guidance_scale: float | None = None  # Flux-dev 3.5, SD3 7.0, PixArt 4.5, DiT 4.0 when None
    height: int | None = None  # pixels; smaller is cheaper but moves Flux/SD3 resolution-dependent shifts
    width: int | None = None
    max_sequence_length: int | None = None  # text tokens; short prompts rarely need the 512 default
    extra: Mapping[str, Any] = field(default_factory=dict)  # other __call__ kwargs, e.g. num_frames

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline `__call__` keywords these settings fix (unset ones left to the pipeline)."""
        named = {
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.max_sequence_length,
        }
        return {**{k: v for k, v in named.items() if v is not None}, **self.extra}

    def __post_init__(self) -> None:
        scale = self.guidance_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 0):
            raise ConfigError(f"guidance_scale must be a number >= 0 or None, got {scale!r}")
        for name in ("height", "width", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
        clash = sorted(RESERVED_CALL_KWARGS & set(self.extra))
        if clash:
            raise ConfigError(
                f"sampling extra keys {clash} are set by adatsq itself; use the fields guidance_scale, "
                "height, width, max_sequence_length, or drop them"
            )
        try:
            json.dumps(dict(self.extra))
        except TypeError as err:
            raise ConfigError(f"sampling extra must hold JSON values only: {err}") from None
        object.__setattr__(self, "extra", dict(self.extra))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusersSampling:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown sampling keys {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"cannot read {path}: {err}; restore the file or save the model again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def write_settings(folder: Path, sampling: DiffusersSampling, dtype: torch.dtype) -> None:
    """Write adatsq_pipeline.json into `folder` (atomically)."""
    settings = {
        "format_version": SETTINGS_VERSION,
        "sampling": sampling.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
    }
    write_json(folder / SETTINGS_FILE, settings)


def read_settings(folder: Path) -> tuple[DiffusersSampling | None, torch.dtype | None]:
    """Sampling and dtype stored in `folder`, or (None, None) when it has no settings file."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return None, None
    settings = read_json(path)
    if settings.get("format_version") != SETTINGS_VERSION:
        raise ConfigError(
            f"{path} has format_version {settings.get('format_version')!r}; this adatsq reads "
            f"{SETTINGS_VERSION}: upgrade adatsq or delete the file"
        )
    unknown = sorted(set(settings) - {"format_version", "sampling", "dtype"})
    if unknown:
        raise ConfigError(f"{path} has unknown keys {unknown}; allowed: dtype, format_version, sampling")
    dtype = getattr(torch, str(settings.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{path} names dtype {settings.get('dtype')!r}, which torch does not have")
    return DiffusersSampling.from_dict(settings.get("sampling", {})), dtype


def raised_by_pipeline(err: BaseException) -> bool:
    """The error comes from a diffusers pipeline's own code (its argument checks), not from a model."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}diffusers{os.sep}pipelines{os.sep}" in frames[-1].filename


def sampling_refused(
    pipeline: str,
    call: Mapping[str, Any],
    call_params: Mapping[str, Any],
    sample_size: Any,
    source: str | None,
    err: BaseException,
) -> SamplingError:
    """One line for a pipeline that refused the settings it was called with: which ones, and the fix."""
    where = str(Path(source) / SETTINGS_FILE) if source else f"{SETTINGS_FILE} beside model_index.json"
    settings = ", ".join(f"{k}={v!r}" for k, v in call.items()) or "its default settings"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "use_resolution_binning" in call_params and call.get("use_resolution_binning", True):
        fix = (
            f"its resolution binning knows only the released transformer sample sizes (this one's is "
            f'{sample_size}): set "use_resolution_binning": false under sampling.extra in {where}, and '
            "height / width there"
        )
    else:
        fix = f"change sampling (height, width, guidance_scale, max_sequence_length, extra) in {where}"
    return SamplingError(f"{pipeline} refused to sample with {settings}: {reason}; {fix}")
