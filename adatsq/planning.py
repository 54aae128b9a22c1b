"""AdaTSQ orchestration: calibrate per segment, weigh segments by Fisher, build the error table, search.

Everything model-specific happens here (the `plan/` package is pure): candidate variants are solved once
per layer × bit-width, the error table E[l, s, b] = w_s · tr((W−Q_b) H_{l,s} (W−Q_b)ᵀ) is evaluated from
them, and partial plans are measured by running the real quantized layers (TimestepQuantLinear) along
the sampler's trajectory against the full-precision one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.fisher import fisher_weights, segment_weights
from adatsq.calibrate.runner import collect_stats
from adatsq.engine import LayerSpec, select_layers, set_module, solve_layer
from adatsq.errors import ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_for
from adatsq.plan.problem import PlanProblem
from adatsq.plan.schema import LayerInfo, PartialPlan
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.scheme import QuantizedWeight
from adatsq.recipe import Recipe
from adatsq.timesteps import SegmentMap, install_segment_hook

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What one calibration pass yields; planning and the final GPTQ solves both reuse it."""

    adapter: ModelAdapter
    layers: dict[str, nn.Linear]
    segments: SegmentMap
    stats: dict[str, LayerStats]
    step_weights: torch.Tensor  # Fisher weight per sampler step (sums to 1)
    fisher_method: str
    seconds: float

    @property
    def weights(self) -> torch.Tensor:
        """Fisher weight per segment."""
        return segment_weights(self.step_weights, self.segments.step_ranges)


def calibrate(model: Any, recipe: Recipe, inputs: Sequence[Any] | None = None, progress: bool = True) -> Calibration:
    """Per-segment statistics plus temporal Fisher weights (uniform when the recipe turns Fisher off)."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    cal = recipe.calibration
    layers = select_layers(adapter.denoiser(), recipe)
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), cal.segments)
    inputs = list(inputs) if inputs is not None else adapter.default_inputs(cal.samples, cal.seed)
    stats = collect_stats(adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=cal.seed, progress=progress)
    if recipe.planner.fisher:
        fisher_inputs = inputs[: recipe.planner.fisher_samples]
        step_weights, method = fisher_weights(
            adapter, fisher_inputs, cal.steps, seed=cal.seed, batch_size=cal.batch_size, progress=progress
        )
    else:
        step_weights, method = torch.full((cal.steps,), 1.0 / cal.steps), "uniform"
    return Calibration(adapter, layers, segments, stats, step_weights, method, time.perf_counter() - start)


def layer_infos(calibration: Calibration, recipe: Recipe) -> list[LayerInfo]:
    """Sizes and per-step MACs (tokens per denoiser call measured during calibration)."""
    steps = len(calibration.segments.timesteps)
    infos = []
    for name, linear in calibration.layers.items():
        tokens_per_step = int(calibration.stats[name].tokens.sum()) / steps / recipe.calibration.samples
        infos.append(
            LayerInfo(
                name=name,
                n_params=linear.in_features * linear.out_features,
                in_features=linear.in_features,
                out_features=linear.out_features,
                macs_per_step=max(1, round(tokens_per_step * linear.in_features * linear.out_features)),
                group_size=recipe.weight.group_size,
            )
        )
    return infos


def solve_candidates(
    calibration: Calibration, recipe: Recipe, bits: Sequence[int], progress: bool = True
) -> dict[str, dict[int, QuantizedWeight]]:
    """Every layer at every candidate bit-width, GPTQ on the Fisher-weighted Hessian of all segments."""
    weights = calibration.weights if recipe.planner.fisher else None
    variants: dict[str, dict[int, QuantizedWeight]] = {}
    for name, linear in tqdm(calibration.layers.items(), desc="candidates", unit="layer", disable=not progress):
        hessian = calibration.stats[name].hessian(weights) if recipe.method != "rtn" else None
        spec = LayerSpec((bits[0],), recipe.weight.group_size, recipe.weight.symmetric)
        variants[name] = {b: solve_layer(linear.weight.detach().float(), hessian, spec.scheme(b), recipe)[0] for b in bits}
    return variants


def error_table(
    calibration: Calibration, variants: dict[str, dict[int, QuantizedWeight]], bits: Sequence[int], fisher: bool
) -> np.ndarray:
    """E[l, s, b] = w_s · tr((W − Q_b) H_{l,s} (W − Q_b)ᵀ) with H_{l,s} the segment's mean XᵀX."""
    seg_w = calibration.weights if fisher else torch.full((calibration.segments.count,), 1 / calibration.segments.count)
    table = np.zeros((len(variants), calibration.segments.count, len(bits)))
    for l, (name, by_bits) in enumerate(variants.items()):
        W = calibration.layers[name].weight.detach().double()
        stats = calibration.stats[name]
        for b, bit in enumerate(bits):
            D = W - by_bits[bit].dequantize().double()
            for s in range(calibration.segments.count):
                table[l, s, b] = float(seg_w[s]) * float(((D @ stats.segment_hessian(s)) * D).sum())
    return table


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
        variants: dict[str, dict[int, QuantizedWeight]],
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
            self.switching[name] = {
                b: QuantLinear.from_quantized(qw, bias, recipe.activation) for b, qw in variants[name].items()
            }
        self.calls = 0

    def _trajectory(self, stop_after: int | None = None) -> dict[int, torch.Tensor]:
        latents: dict[int, torch.Tensor] = {}

        def record(step: int, x: torch.Tensor) -> None:
            latents[step] = x.detach().clone()
            if stop_after is not None and step + 1 >= stop_after:
                raise _StopSampling

        try:
            with torch.no_grad():
                self.adapter.generate(self.inputs, seed=self.seed, num_steps=self.num_steps, step_callback=record)
        except _StopSampling:
            pass
        return latents

    def __call__(self, partial: PartialPlan) -> float:
        denoiser = self.adapter.denoiser()
        covered = partial.last_segment + 1
        modules = {}
        for name, row in partial.bits.items():
            full_row = tuple(row) + (row[-1],) * (self.segments.count - covered)
            modules[name] = TimestepQuantLinear({b: self.switching[name][b] for b in set(full_row)}, full_row)
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
            for name, linear in self.layers.items():
                set_module(denoiser, name, linear)
        self.calls += 1
        return float((latents[end - 1] - self.reference[end - 1]).double().pow(2).mean())


def build_problem(
    calibration: Calibration, recipe: Recipe, table: np.ndarray, bits: Sequence[int], fingerprint: str
) -> PlanProblem:
    infos = layer_infos(calibration, recipe)
    pinned = {info.name: recipe.planner.pin_bits for info in infos if recipe.planner.pins(info.name)}
    if pinned and recipe.planner.pin_bits not in bits:
        raise ConfigError(f"planner.pin_bits {recipe.planner.pin_bits} must be one of the candidates {list(bits)}")
    return PlanProblem(
        layers=infos,
        error_table=table,
        table_bits=tuple(bits),
        segments=calibration.segments.step_ranges,
        fisher_weights=calibration.weights.tolist(),
        model={"family": calibration.adapter.family, "fingerprint": fingerprint},
        act_bits=recipe.activation.bits or 16,
        pinned=pinned,
    )


def model_fingerprint(layers: dict[str, nn.Linear]) -> str:
    """Layer names and shapes: a plan only applies to a model with the same quantizable layers."""
    import hashlib

    text = ";".join(f"{n}:{m.out_features}x{m.in_features}" for n, m in layers.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
