"""Measured end-to-end error of partial plans: real quantized layers run along the sampler's trajectory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adatsq.calibrate.segments import install_segment_hook
from adatsq.core.modules import set_module
from adatsq.engine.calibration import Calibration
from adatsq.engine.solve import Variant
from adatsq.plan.schema import PartialPlan
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.recipe import Recipe


class _StopSampling(Exception):
    """Raised from the step callback once the segments a partial plan covers have run."""


class TrajectoryMeter:
    """Measures partial plans by running the real quantized layers against the float trajectory.

    Every selected layer is swapped for a TimestepQuantLinear holding all candidate variants; a partial
    plan only rewires which variant each segment uses, and sampling stops after its last segment.
    """

    def __init__(
        self,
        calibration: Calibration,
        variants: dict[str, dict[int, Variant]],
        recipe: Recipe,
        inputs: Sequence[Any],
        seed: int,
    ) -> None:
        self.adapter = calibration.adapter
        self.segments = calibration.segments
        self.inputs, self.seed = list(inputs), seed
        self.num_steps = len(self.segments.timesteps)
        self.reference = self._trajectory()
        self.layers = calibration.layers
        self.switching: dict[str, dict[int, QuantLinear]] = {}
        for name, linear in calibration.layers.items():
            bias = None if linear.bias is None else linear.bias.detach().clone()
            self.switching[name] = {b: v.module(bias, recipe.activation) for b, v in variants[name].items()}
        self.calls = 0

    def _trajectory(self, stop_after: int | None = None) -> dict[int, torch.Tensor]:
        latents: dict[int, torch.Tensor] = {}

        def record(step: int, x: torch.Tensor) -> None:
            latents[step] = x.detach().clone()
            if stop_after is not None and step + 1 >= stop_after:
                raise _StopSampling

        try:
            with torch.no_grad():
                self.adapter.generate(
                    self.inputs, seed=self.seed, num_steps=self.num_steps, step_callback=record
                )
        except _StopSampling:
            pass
        return latents

    def __call__(self, partial: PartialPlan) -> float:
        denoiser = self.adapter.denoiser()
        covered = partial.last_segment + 1
        modules = {}
        previous = {name: denoiser.get_submodule(name) for name in partial.bits}  # restored afterwards
        for name, row in partial.bits.items():
            full_row = tuple(row) + (row[-1],) * (self.segments.count - covered)
            modules[name] = TimestepQuantLinear([self.switching[name][b] for b in set(full_row)], full_row)
            set_module(denoiser, name, modules[name])

        def on_call(segment: int, step: int) -> None:
            for module in modules.values():
                module.set_segment(segment)

        handle = install_segment_hook(self.adapter, self.segments, on_call)
        try:
            end = partial.end_step
            latents = self._trajectory(stop_after=end)
        finally:
            handle.remove()
            for name, module in previous.items():  # a model quantized meanwhile stays quantized
                set_module(denoiser, name, module)
        self.calls += 1
        return float((latents[end - 1] - self.reference[end - 1]).double().pow(2).mean())
