"""The adapter protocol: what adatsq needs from a model family, and the registry that finds one.

An adapter binds one family (the reference DiT, a diffusers pipeline, a UMM's generation path) to the
quantizer. Orchestrators only talk to this interface, so families stay small and never copy a driver.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adatsq.core.io import write_json
from adatsq.core.registry import Registry
from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.layers import default_ignore

# Called after every denoising step with (step_index, latents); may return replacement latents
# (Fisher probes inject noise this way) or None to keep them.
StepCallback = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class ModelAdapter(ABC):
    """One model family: which module is quantized, how its sampler runs, how it is saved."""

    family: str  # registry name, stored in checkpoints so `adatsq.load` finds the adapter again
    differentiable: bool = True  # the sampler keeps the autograd graph (gradient Fisher estimates)
    source: str | None = None  # how the user named the float model ("reference", a folder): eval reloads it
    # the checkpoint folder's component folder holding the denoiser (config.json + safetensors); "" is the
    # checkpoint folder itself (a bare model)
    denoiser_folder: str = "denoiser"

    @classmethod
    def open(cls, model: Any, dtype: torch.dtype | None, device: str | None) -> ModelAdapter | None:
        """An adapter for what the user passed (a name, a folder, a pipeline), or None if not this family.

        `adatsq.models.resolve` asks every registered family in turn; the first that answers wins.
        """
        return None

    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The transformer whose Linear layers are quantized; called once per step (per CFG batch)."""

    @abstractmethod
    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        """The timestep value of one denoiser call (read by the forward pre-hook that picks segments)."""

    @abstractmethod
    def step_timesteps(self, num_steps: int) -> list[float]:
        """The timestep values the sampler passes to the denoiser, in step order."""

    @abstractmethod
    def default_inputs(self, count: int, seed: int) -> list[Any]:
        """Calibration / evaluation inputs (class labels, prompts) when the user gives none."""

    def parse_inputs(self, lines: list[str]) -> list[Any]:
        """Calibration inputs read from a file, one per line (prompts by default)."""
        return lines

    @abstractmethod
    def generate(
        self,
        inputs: Sequence[Any],
        seed: int,
        num_steps: int,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Run the full sampler for `inputs` from seed-determined noise; return final samples (float)."""

    @abstractmethod
    def save_base(self, directory: Path, link_components: bool = False) -> None:
        """Write what rebuilds the model around its denoiser: configs and the other components' weights.

        The denoiser's own weights are NOT written here: the checkpoint's model.safetensors holds all of
        them (quantized and not), so the base folder never doubles the checkpoint's size.
        `link_components` (only where `links_components`): the other components' files are linked from
        the folder the model was loaded from instead of written again.
        """

    @property
    def links_components(self) -> bool:
        """Whether `save_base` can link the other components' files from the model's source folder."""
        return False

    def check_linkable(self) -> None:
        """One clear line before any work when the components cannot be linked."""
        if not self.links_components:
            raise ConfigError(
                f"--link-components needs a model loaded from a local diffusers pipeline folder (with "
                f"model_index.json) whose component folders can be linked; {self.source or self.family!r} "
                "is not one: drop the flag to write every component"
            )

    @classmethod
    @abstractmethod
    def load_base(cls, directory: Path) -> ModelAdapter:
        """Rebuild the adapter from `save_base`'s folder; the denoiser may come back uninitialised."""

    def repeated_sampling(self) -> contextlib.AbstractContextManager[None]:
        """Held around a run that samples the same inputs again and again (calibrate, plan, quantize).

        A family may keep what depends on the inputs alone for the run (the diffusers adapter's prompt
        encodings) and move what that replaces off the device; nothing outside the run sees a change.
        """
        return contextlib.nullcontext()

    def default_ignore(self) -> list[str]:
        """Layers a recipe with no `ignore` list leaves in full precision: embedders, final projection.

        Some models also read `.weight` / `.parameters()` of their embedders at run time, so these
        must stay nn.Linear unless a recipe asks for them explicitly.
        """
        return default_ignore(self.denoiser())

    def user_model(self) -> Any:
        """What `adatsq.load` hands back: the pipeline when the family has one, else the denoiser."""
        return self.denoiser()


ADAPTERS: Registry[type[ModelAdapter]] = Registry("model family")


def write_base_json(directory: Path, name: str, data: dict[str, Any]) -> None:
    """The small JSON an adapter's `save_base` keeps (configs, sampler settings)."""
    write_json(directory / name, data)


class _BaseJson(dict):
    """A dict read from a base/ JSON file: a missing key is a CheckpointError naming the file."""

    path: Path

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(
            f"{self.path}: key {key!r} is missing; the checkpoint folder is damaged or was written by "
            "another version: re-run quantize"
        )


def read_base_json(directory: Path, name: str) -> dict[str, Any]:
    """Counterpart of `write_base_json`; a missing file, bad JSON or a missing key is a CheckpointError."""
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint folder is incomplete: re-run quantize")

    def as_dict(pairs: list[tuple[str, Any]]) -> _BaseJson:
        data = _BaseJson(pairs)
        data.path = path
        return data

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=as_dict)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {detail}); re-run quantize") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}; re-run quantize")
    return data


def parse_class_labels(lines: list[str], classes: int, model_name: str) -> list[int]:
    """Calibration lines of a class-conditional model: one integer label in [0, classes) per line."""
    for i, line in enumerate(lines, 1):
        # ASCII digits only: str.isdigit also accepts '²' (which int() refuses) and other scripts' digits
        if not (line.isascii() and line.isdigit() and len(line) <= 6 and int(line) < classes):
            shown = repr(line) if len(line) <= 40 else f"{line[:20]!r}... ({len(line)} characters)"
            raise ConfigError(
                f"calibration line {i}: {shown} is not a class label; {model_name} takes "
                f"ints 0..{classes - 1} (ASCII digits), one per line"
            )
    return [int(line) for line in lines]
