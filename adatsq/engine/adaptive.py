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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adatsq.calibrate.fisher import plot_fisher
from adatsq.checkpoint.format import LayerSpec
from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.calibration import Calibration, calibrate, measured_tokens
from adatsq.engine.meter import TrajectoryMeter
from adatsq.engine.solve import Variant, solve_variant, variant_statistics
from adatsq.engine.surgery import select_layers
from adatsq.engine.uniform import quantize
from adatsq.errors import ConfigError, PlanError
from adatsq.models.resolve import adapter_for
from adatsq.plan.beam import METHODS
from adatsq.plan.cost import budget_cost, cheapest_plan_cost, check_budget_feasible
from adatsq.plan.frontier import save_frontier, sweep
from adatsq.plan.plots import plot_frontier, plot_plan
from adatsq.plan.problem import PlanProblem, SearchConfig, SearchResult
from adatsq.plan.schema import Budget, LayerInfo, Plan, check_plan_matches, save_plan
from adatsq.quant.transforms import transform_hessian
from adatsq.recipe import Recipe, parse_budget

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


def precheck_budget(model: Any, recipe: Recipe, budget: Budget) -> None:
    """Fail before calibration when a size-only budget (avg_bits, bytes) is below the cheapest plan."""
    if budget.kind == "bops":
        return  # needs token counts: checked by the search once calibration measured them
    adapter = adapter_for(model)
    infos = layer_infos(select_layers(adapter, recipe), recipe)
    pinned = {i.name: recipe.planner.pin_bits for i in infos if recipe.planner.pins(i.name)}
    candidates = recipe.planner.candidates
    check_budget_feasible(
        infos, budget, candidates, recipe.calibration.segments, recipe.activation.bits or 16, pinned
    )


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


def plan_calibration(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with the plan's sampler schedule; a recipe that sets another schedule is an error."""
    cal = recipe.calibration
    if (cal.steps, cal.segments) != (plan.num_steps, len(plan.segments)):
        raise PlanError(
            f"the plan was made for {plan.num_steps} sampler steps in {len(plan.segments)} segments but the "
            f"recipe calibrates {cal.steps} steps in {cal.segments}; use the recipe the plan was made with"
        )
    return recipe


def quantize_with_plan(
    model: Any,
    recipe: Recipe,
    plan: Plan,
    inputs: Sequence[Any] | None = None,
    progress: bool = True,
    resume: Path | None = None,
) -> QuantizedModel:
    """Calibrate per segment and solve each layer's distinct bit-widths as the plan says."""
    recipe = plan_calibration(recipe, plan)
    calibration = calibrate(model, recipe, inputs, progress, known_weights=plan.fisher_weights, resume=resume)
    check_plan_matches(plan, list(calibration.layers), len(calibration.segments.timesteps))
    if plan.model.get("fingerprint") not in (None, model_fingerprint(calibration.layers)):
        raise PlanError("the plan was made for a model with other layer shapes; re-plan for this model")
    return finish(calibration, recipe, plan, progress)


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
        calibration = calibrate(model, recipe, inputs, progress, resume=resume)
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


def recipe_budget(recipe: Recipe) -> Budget:
    kind, value = parse_budget(recipe.planner.budget)
    return Budget(kind, value)


def quantize_adaptive(
    model: Any,
    recipe: Recipe,
    inputs: Sequence[Any] | None = None,
    progress: bool = True,
    resume: Path | None = None,
) -> QuantizedModel:
    """method 'adatsq' without a plan file: plan under the recipe's budget, then quantize with that plan."""
    precheck_budget(model, recipe, recipe_budget(recipe))
    planner = Planner.prepare(model, recipe, inputs, progress, resume)
    result = planner.search(recipe_budget(recipe))
    qmodel = planner.quantize(result.plan, progress)
    qmodel.report["search_seconds"] = result.search_seconds
    return qmodel


def sweep_budgets(planner: Planner, kind: str, values: str | None) -> list[Budget]:
    """Budgets of `kind` from a comma list, else 6 evenly spaced from the cheapest plan to all-max bits."""
    if values:
        try:
            return [Budget(kind, float(v)) for v in values.split(",")]
        except ValueError:
            raise ConfigError(
                f"--sweep {values!r} must be comma-separated numbers, e.g. 3.5,4,4.5,5,6"
            ) from None
    problem, candidates = planner.problem, planner.recipe.planner.candidates
    low = cheapest_plan_cost(
        problem.layers, kind, candidates, problem.num_segments, problem.act_bits, problem.pinned
    )
    high_bits = np.full((len(problem.layers), problem.num_segments), max(candidates))
    high = budget_cost(high_bits, problem.layers, kind, problem.act_bits)
    return [Budget(kind, float(v)) for v in np.linspace(low * 1.02, high, 6)]


def plan_command(
    model: Any,
    recipe: Recipe,
    budget_text: str | None,
    out: Path,
    inputs: Sequence[Any] | None = None,
    frontier_path: Path | None = None,
    sweep_values: str | None = None,
    plot_path: Path | None = None,
    resume: Path | None = None,
) -> str:
    """`adatsq plan`: search, write plan.json (+ heat map, Fisher plot), optionally a frontier."""
    budget = Budget(*parse_budget(budget_text)) if budget_text else recipe_budget(recipe)
    precheck_budget(model, recipe, budget)
    planner = Planner.prepare(model, recipe, inputs, resume=resume)
    result = planner.search(budget)
    save_plan(result.plan, out)
    plot_plan(result.plan, out.with_suffix(".png"))
    calibration = planner.calibration
    plot_fisher(calibration.step_weights, calibration.segments.timesteps, out.with_suffix(".fisher.png"))
    lines = [
        f"wrote {out}: {result.method} plan under {budget.kind}={budget.value:g} "
        f"(avg_bits {result.metrics['avg_bits']:.3f}, bytes {result.metrics['bytes']}, "
        f"measured_error {result.metrics['measured_error']}) in {result.search_seconds:.1f} s "
        f"with {result.measure_calls} measured trajectories"
    ]
    if frontier_path is not None:
        frontier = sweep(planner.problem, sweep_budgets(planner, budget.kind, sweep_values), planner.config(),
                         planner.meter, planner.recipe.planner.search)  # fmt: skip
        save_frontier(frontier, frontier_path)
        if plot_path is not None:
            plot_frontier(frontier, plot_path)
        lines.append(f"wrote {frontier_path}: {len(frontier.points)} Pareto points")
    return "\n".join(lines)
