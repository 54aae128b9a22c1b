"""The AdaTSQ planner of one calibrated model: candidate variants, the error table, the search problem.

Candidate variants are solved once per layer × bit-width, the error table E[l, s, b] =
w_s · tr((W−Q_b) H_{l,s} (W−Q_b)ᵀ) is evaluated from them, and partial plans are measured by running
the real quantized layers (TimestepQuantLinear) along the sampler's trajectory against the float one.
A `Planner` is reused across budgets (frontier sweeps) and search methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.checkpoint.format import LayerSpec
from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.calibration import Calibration, calibrate, measured_tokens
from adatsq.engine.meter import TrajectoryMeter
from adatsq.engine.solve import Variant, solve_variant, variant_statistics
from adatsq.engine.uniform import quantize
from adatsq.plan.beam import METHODS
from adatsq.plan.problem import PlanProblem, SearchConfig, SearchResult
from adatsq.plan.schema import Budget, LayerInfo, Plan, check_plan_matches
from adatsq.quant.transforms import transform_hessian
from adatsq.recipe import Recipe

log = logging.getLogger(__name__)


def layer_infos(
    layers: dict[str, nn.Linear], recipe: Recipe, tokens_per_step: dict[str, float] | None = None
) -> list[LayerInfo]:
    """Sizes and per-step MACs; without measured token counts MACs assume one token (sizes still exact)."""
    return [
        LayerInfo(
            name=name,
            n_params=linear.in_features * linear.out_features,
            in_features=linear.in_features,
            out_features=linear.out_features,
            macs_per_step=max(
                1, round((tokens_per_step or {}).get(name, 1.0) * linear.in_features * linear.out_features)
            ),
            group_size=recipe.weight.group_size,
        )
        for name, linear in layers.items()
    ]


def solve_candidates(
    calibration: Calibration, recipe: Recipe, bits: Sequence[int], progress: bool = True
) -> dict[str, dict[int, Variant]]:
    """Every layer at every candidate bit-width, solved on the Fisher-weighted statistics of all segments."""
    weights = calibration.weights if recipe.planner.fisher else None
    everywhere = torch.ones(calibration.segments.count, dtype=torch.bool)
    variants: dict[str, dict[int, Variant]] = {}
    for name, linear in tqdm(
        calibration.layers.items(), desc="candidates", unit="layer", disable=None if progress else True
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


def build_problem(
    calibration: Calibration, recipe: Recipe, table: np.ndarray, bits: Sequence[int], fingerprint: str
) -> PlanProblem:
    infos = layer_infos(calibration.layers, recipe, measured_tokens(calibration))
    pinned = {info.name: recipe.planner.pin_bits for info in infos if recipe.planner.pins(info.name)}
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


def finish(calibration: Calibration, recipe: Recipe, plan: Plan, progress: bool) -> QuantizedModel:
    """The final solves: per layer and distinct bits, GPTQ on the Fisher-weighted Hessian of its segments."""
    weights = calibration.weights if recipe.planner.fisher else None
    qmodel = quantize(
        calibration.adapter,
        recipe,
        layer_bits=plan.layers,
        segment_weights=weights,
        stats=calibration.stats,
        progress=progress,
    )
    qmodel.report["calibration_seconds"] = calibration.seconds
    qmodel.report["fisher"] = {"method": calibration.fisher_method, "segment_weights": plan.fisher_weights}
    qmodel.plan = plan
    return qmodel


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
        cls,
        model: Any,
        recipe: Recipe,
        inputs: Sequence[Any] | None = None,
        progress: bool = True,
        resume: Path | None = None,
    ) -> Planner:
        """Calibrate `model`, then build the planner on that calibration."""
        return cls.from_calibration(
            calibrate(model, recipe, inputs, progress, resume=resume), recipe, progress
        )

    @classmethod
    def from_calibration(cls, calibration: Calibration, recipe: Recipe, progress: bool = True) -> Planner:
        """Candidate variants, error table and meter on an existing calibration (benchmarks share one)."""
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

    def config(self) -> SearchConfig:
        planner = self.recipe.planner
        return SearchConfig(
            beam_width=planner.beam_width,
            proposals_per_stage=planner.proposals_per_stage,
            candidates=tuple(sorted(planner.candidates)),
        )

    def search(self, budget: Budget, method: str | None = None) -> SearchResult:
        return METHODS.get(method or self.recipe.planner.search)(
            self.problem, budget, self.config(), self.meter
        )

    def quantize(self, plan: Plan, progress: bool = True) -> QuantizedModel:
        check_plan_matches(plan, list(self.calibration.layers), len(self.calibration.segments.timesteps))
        qmodel = finish(self.calibration, self.recipe, plan, progress)
        qmodel.report["table_seconds"] = self.table_seconds
        return qmodel
