"""One pipeline call, watched: step boundaries, the denoiser's timestep per step, latents per step.

diffusers pipelines expose steps in two ways: `callback_on_step_end` (Flux, SD3, Wan, Z-Image, QwenImage),
whose return value may replace the latents, and nothing at all (PixArt, DiT), where the scheduler's step
output is watched instead. Both end in `StepWatcher.end_step`, so every family behaves the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adatsq.errors import AdatsqError
from adatsq.models.base import StepCallback

TimestepReader = Callable[[tuple[Any, ...], dict[str, Any]], float]


class StepWatcher:
    """Counts denoising steps, records each step's denoiser timestep, hands latents to a callback."""

    def __init__(self, timestep_of: TimestepReader, batch: int, callback: StepCallback | None) -> None:
        self.timestep_of, self.batch, self.callback = timestep_of, batch, callback
        self.step = 0
        self.timesteps: list[float] = []
        self.latents: torch.Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(self.timesteps) == self.step:  # first denoiser call of this step (true CFG calls twice)
            self.timesteps.append(self.timestep_of(args, kwargs))

    def end_step(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The latents after one step; returns replacement latents (same shape) or None."""
        new = None if self.callback is None else self.callback(self.step, latents)
        if new is not None:
            if new.shape != latents.shape:
                raise AdatsqError(
                    f"step callback returned latents of shape {tuple(new.shape)} at step {self.step}; "
                    f"expected {tuple(latents.shape)}"
                )
            new = new.to(device=latents.device, dtype=latents.dtype)
        self.latents = latents if new is None else new
        self.step += 1
        return new

    def on_step_end(self, pipe: Any, index: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' callback_on_step_end: returning {"latents": x} replaces the pipeline's latents."""
        new = self.end_step(tensors["latents"])
        return {} if new is None else {"latents": new}

    def wrap_scheduler_step(self, step: Any) -> Any:
        """For pipelines without callback_on_step_end (PixArt, DiT): watch the scheduler's output.

        DiT steps on the CFG-doubled batch, whose halves are identical; the callback sees one copy.
        """

        def watched(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.prev_sample
            copies = sample.shape[0] // self.batch
            new = self.end_step(sample[: self.batch])
            if new is None:
                return out
            new = new.repeat(copies, *([1] * (new.dim() - 1)))
            if isinstance(out, tuple):
                return (new, *out[1:])
            out.prev_sample = new
            return out

        return watched
