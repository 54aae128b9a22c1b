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

from adatsq.calibrate.capture import LayerStats
from adatsq.calibrate.distributed import merge_owned
from adatsq.checkpoint.format import LayerSpec
from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.calibration import Calibration, calibrate
from adatsq.engine.meter import TrajectoryMeter
from adatsq.engine.shares import LayerResult, ShareResult, share_store, solved_shares
from adatsq.engine.solve import Variant, solve_variant, variant_statistics
from adatsq.engine.uniform import quantize
from adatsq.errors import CalibrationError
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
            integer_group_scales=recipe.weight.integer_group_scales,
        )
        for name, linear in layers.items()
    ]


@dataclass
class Candidates:
    """Every layer solved at every candidate bit-width, with its error-table rows and measured tokens."""

    variants: dict[str, dict[int, Variant]]  # packed, on the host
    errors: dict[str, np.ndarray]  # [segments, bits]: w_s · tr((W − Q_b) H_s (W − Q_b)ᵀ)
    tokens: dict[str, float]  # tokens entering the layer per sampler step per calibration input

    def table(self, names: Sequence[str]) -> np.ndarray:
        """E[l, s, b] in the order of `names`."""
        return np.stack([self.errors[name] for name in names])


def solve_candidates(
    calibration: Calibration, recipe: Recipe, bits: Sequence[int], progress: bool = True
) -> Candidates:
    """Candidates on the Fisher-weighted statistics of all segments, group by group of statistics.

    Each group's statistics are dropped once its layers are solved and scored, so under a memory budget
    no more than one pass's accumulators exist; with several processes each rank solves the layers it
    owns and every rank ends with all of them.
    """
    fisher = recipe.planner.fisher
    weights = calibration.weights if fisher else None
    count = calibration.segments.count
    segment_weights = calibration.weights if fisher else torch.full((count,), 1 / count)
    everywhere = torch.ones(count, dtype=torch.bool)
    steps = len(calibration.segments.timesteps)
    variants: dict[str, dict[int, Variant]] = {}
    errors: dict[str, np.ndarray] = {}
    tokens: dict[str, float] = {}
    weight = recipe.weight
    spec = LayerSpec((bits[0],), weight.group_size, weight.symmetric, weight.integer_group_scales)

    def solve(group: dict[str, LayerStats]) -> ShareResult:
        solved = {}
        for name, stats in group.items():
            check_filled(name, stats, segment_weights, calibration.segments.step_ranges)
            hessian, absmax = variant_statistics(stats, everywhere, weights)
            W = calibration.layers[name].weight.detach().float()
            by_bits = {b: solve_variant(W, hessian, absmax, spec.scheme(b), recipe) for b in bits}
            del hessian, absmax  # the error table needs [in, in] room of its own, not beside this H
            per_step = int(stats.tokens.sum()) / steps / calibration.inputs
            solved[name] = LayerResult(by_bits, layer_errors(W, stats, by_bits, segment_weights), per_step)
        return solved

    fisher_list = None if weights is None else weights.tolist()
    store = share_store(
        calibration.resume, calibration.statistics, "candidates", recipe, tuple(bits), fisher_list
    )
    bar = tqdm(
        total=len(calibration.layers), desc="candidates", unit="layer", disable=None if progress else True
    )
    for result in solved_shares(calibration.statistics, solve, store):
        for name, layer in result.items():
            variants[name], errors[name], tokens[name] = layer.variants, layer.errors, layer.tokens
            bar.update()
    bar.close()
    return Candidates(*merge_owned(variants, errors, tokens))


def check_filled(
    name: str, stats: LayerStats, segment_weights: torch.Tensor, step_ranges: Sequence[tuple[int, int]]
) -> None:
    """A segment that counts (weight > 0) but gave the layer no tokens has an unknown error, not a zero
    one: the search would give the layer its lowest bits there for free."""
    empty = [s for s, w in enumerate(segment_weights.tolist()) if w > 0 and int(stats.tokens[s]) == 0]
    if empty:
        start, end = step_ranges[empty[0]]
        raise CalibrationError(
            f"layer {name!r} received no calibration tokens in timestep segment {empty[0]} (sampler steps "
            f"{start}-{end - 1}), so its error there is unknown; it does not run at those steps: add it "
            "to the recipe's ignore list, or use fewer calibration.segments"
        )


ERROR_ROWS = 256  # rows of W − Q_b formed at a time: the error table's [out, in] room is 48 · rows · in


def error_rows(out_features: int) -> int:
    """Rows per chunk of the error table's differences: at most an eighth of the layer (≥ 1), at most
    ERROR_ROWS, so 48 · rows · in stays under the GPTQ solve's own 8 · out · in (workspace.py) for every
    layer shape. A function of the shape only: the table's values never depend on a budget."""
    return max(1, min(ERROR_ROWS, out_features // 8))


def layer_errors(
    W: torch.Tensor, stats: LayerStats, by_bits: dict[int, Variant], segment_weights: torch.Tensor
) -> np.ndarray:
    """[segments, bits] of w_s · tr((W − Q_b) H_s (W − Q_b)ᵀ) with H_s the segment's mean XᵀX.

    Q_b is compared in the variant's own input basis (smoothed / rotated), with H transformed alike.
    Memory: one float64 [in, in] segment mean at a time (the next one is formed after the last is
    freed) and its transformed copy, beside `error_rows(out)` rows of float64 differences: the table
    fits in the room the schedule reserves for the layer's GPTQ solve, whatever out / in.
    """
    rows = np.zeros((len(segment_weights), len(by_bits)))
    step = error_rows(W.shape[0])
    for s in range(len(segment_weights)):
        segment = stats.segment_hessian(s)
        for b, variant in enumerate(by_bits.values()):
            H = transform_hessian(segment, variant.transform)
            total = 0.0
            for start in range(0, W.shape[0], step):
                D = _difference(W, variant, slice(start, start + step))
                total += float(((D @ H) * D).sum())
                del D
            rows[s, b] = float(segment_weights[s]) * total
            del H
        del segment
    return rows


def _difference(W: torch.Tensor, variant: Variant, rows: slice) -> torch.Tensor:
    """float64 (W'' − L_b L_a − Q_b)[rows]: the variant's error on those output rows, in its basis."""
    t = variant.transform
    target = t.fold(W[rows]).to(torch.float64, copy=True)  # never W itself: it is changed in place
    if t.lowrank_a is not None:
        target -= t.lowrank_b[rows].double() @ t.lowrank_a.double()
    target -= variant.weight.dequantize(rows).double()
    return target


def build_problem(
    calibration: Calibration, recipe: Recipe, candidates: Candidates, bits: Sequence[int]
) -> PlanProblem:
    infos = layer_infos(calibration.layers, recipe, candidates.tokens)
    pinned = {info.name: recipe.planner.pin_bits for info in infos if recipe.planner.pins(info.name)}
    return PlanProblem(
        layers=infos,
        error_table=candidates.table(list(calibration.layers)),
        table_bits=tuple(bits),
        segments=calibration.segments.step_ranges,
        fisher_weights=calibration.weights.tolist(),
        model={"family": calibration.adapter.family, "fingerprint": model_fingerprint(calibration.layers)},
        act_bits=recipe.activation.bits or 16,
        pinned=pinned,
        fisher_method=calibration.fisher_method,
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
        statistics=calibration.statistics,
        resume=calibration.resume,
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
        candidates = solve_candidates(calibration, recipe, bits, progress)
        problem = build_problem(calibration, recipe, candidates, bits)
        meter = None
        if recipe.planner.measure:
            measure_inputs = calibration.adapter.default_inputs(
                recipe.planner.measure_samples, recipe.calibration.seed + 1
            )
            meter = TrajectoryMeter(
                calibration, candidates.variants, recipe, measure_inputs, seed=recipe.calibration.seed + 1
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
