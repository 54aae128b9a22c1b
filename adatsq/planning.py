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
from adatsq.engine import (
    LayerSpec,
    QuantizedModel,
    Variant,
    quantize,
    select_layers,
    set_module,
    solve_variant,
    variant_statistics,
)
from adatsq.errors import ConfigError
from adatsq.models.base import ModelAdapter
from adatsq.models.resolve import adapter_for
from adatsq.plan.beam import METHODS
from adatsq.plan.problem import PlanProblem, SearchConfig, SearchResult
from adatsq.plan.schema import Budget, LayerInfo, PartialPlan, Plan, check_plan_matches
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.transforms import transform_hessian
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


def calibrate(
    model: Any, recipe: Recipe, inputs: Sequence[Any] | None = None, progress: bool = True
) -> Calibration:
    """Per-segment statistics plus temporal Fisher weights (uniform when the recipe turns Fisher off)."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    cal = recipe.calibration
    layers = select_layers(adapter.denoiser(), recipe)
    segments = SegmentMap.from_schedule(adapter.step_timesteps(cal.steps), cal.segments)
    inputs = list(inputs) if inputs is not None else adapter.default_inputs(cal.samples, cal.seed)
    stats = collect_stats(
        adapter, layers, segments, inputs, batch_size=cal.batch_size, seed=cal.seed, progress=progress
    )
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
) -> dict[str, dict[int, Variant]]:
    """Every layer at every candidate bit-width, solved on the Fisher-weighted statistics of all segments."""
    weights = calibration.weights if recipe.planner.fisher else None
    everywhere = torch.ones(calibration.segments.count, dtype=torch.bool)
    variants: dict[str, dict[int, Variant]] = {}
    for name, linear in tqdm(
        calibration.layers.items(), desc="candidates", unit="layer", disable=not progress
    ):
        hessian, absmax = variant_statistics(calibration.stats[name], everywhere, weights)
        spec = LayerSpec((bits[0],), recipe.weight.group_size, recipe.weight.symmetric)
        W = linear.weight.detach().float()
        variants[name] = {b: solve_variant(W, hessian, absmax, spec.scheme(b), recipe) for b in bits}
    return variants


def error_table(
    calibration: Calibration, variants: dict[str, dict[int, Variant]], bits: Sequence[int], fisher: bool
) -> np.ndarray:
    """E[l, s, b] = w_s · tr((W − Q_b) H_{l,s} (W − Q_b)ᵀ) with H_{l,s} the segment's mean XᵀX.

    Q_b is compared in the variant's own input basis (smoothed / rotated), with H transformed alike.
    """
    count = calibration.segments.count
    seg_w = calibration.weights if fisher else torch.full((count,), 1 / count)
    table = np.zeros((len(variants), count, len(bits)))
    for row, (name, by_bits) in enumerate(variants.items()):
        W = calibration.layers[name].weight.detach().float()
        stats = calibration.stats[name]
        for b, bit in enumerate(bits):
            variant = by_bits[bit]
            target = variant.transform.fold(W).double()
            if variant.transform.lowrank_a is not None:
                target = target - variant.transform.lowrank_b.double() @ variant.transform.lowrank_a.double()
            D = target - variant.weight.dequantize().double()
            for s in range(count):
                H = transform_hessian(stats.segment_hessian(s), variant.transform)
                table[row, s, b] = float(seg_w[s]) * float(((D @ H) * D).sum())
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
        raise ConfigError(
            f"planner.pin_bits {recipe.planner.pin_bits} must be one of the candidates {list(bits)}"
        )
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


@dataclass
class Planner:
    """One calibrated model ready to search: reused across budgets (frontier sweeps) and methods."""

    calibration: Calibration
    recipe: Recipe
    problem: PlanProblem
    meter: TrajectoryMeter | None
    table_seconds: float

    @classmethod
    def prepare(
        cls, model: Any, recipe: Recipe, inputs: Sequence[Any] | None = None, progress: bool = True
    ) -> Planner:
        calibration = calibrate(model, recipe, inputs, progress)
        start = time.perf_counter()
        bits = tuple(sorted(set(recipe.planner.candidates) | {recipe.planner.pin_bits}))
        variants = solve_candidates(calibration, recipe, bits, progress)
        table = error_table(calibration, variants, bits, recipe.planner.fisher)
        problem = build_problem(calibration, recipe, table, bits, model_fingerprint(calibration.layers))
        meter = None
        if recipe.planner.measure:
            measure_inputs = calibration.adapter.default_inputs(
                recipe.planner.measure_samples, recipe.calibration.seed + 1
            )
            meter = TrajectoryMeter(
                calibration, variants, recipe, measure_inputs, seed=recipe.calibration.seed + 1
            )
        return cls(calibration, recipe, problem, meter, time.perf_counter() - start)

    def search(self, budget: Budget, method: str | None = None) -> SearchResult:
        planner = self.recipe.planner
        config = SearchConfig(
            beam_width=planner.beam_width,
            proposals_per_stage=planner.proposals_per_stage,
            candidates=tuple(sorted(planner.candidates)),
        )
        return METHODS.get(method or planner.search)(self.problem, budget, config, self.meter)

    def quantize(self, plan: Plan, progress: bool = True) -> QuantizedModel:
        """Final solve: per layer and distinct bits, GPTQ on the Fisher-weighted Hessian of its segments."""
        check_plan_matches(plan, list(self.calibration.layers), len(self.calibration.segments.timesteps))
        weights = self.calibration.weights if self.recipe.planner.fisher else None
        qmodel = quantize(
            self.calibration.adapter,
            self.recipe,
            layer_bits=plan.layers,
            segment_weights=weights,
            stats=self.calibration.stats,
            progress=progress,
        )
        qmodel.report["calibration_seconds"] = self.calibration.seconds
        qmodel.report["plan"] = {"metrics": plan.metrics, "fisher_weights": plan.fisher_weights}
        return qmodel
