"""AdaTSQ flows: quantize with a plan file, plan under the recipe's budget then quantize, `adatsq plan`.

Everything model-specific happens in the engine (the `plan/` package is pure); `engine.planner` holds
the calibrated search problem these flows share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adatsq.calibrate.fisher import plot_fisher
from adatsq.calibrate.segments import split_steps
from adatsq.checkpoint.save import QuantizedModel
from adatsq.engine.calibration import calibrate
from adatsq.engine.planner import Planner, finish, layer_infos, model_fingerprint
from adatsq.engine.surgery import select_layers
from adatsq.errors import ConfigError, PlanError
from adatsq.models.resolve import adapter_for
from adatsq.plan.cost import budget_cost, cheapest_plan_cost, check_budget_feasible
from adatsq.plan.frontier import save_frontier, sweep
from adatsq.plan.plots import plot_frontier, plot_plan
from adatsq.plan.schema import Budget, Plan, check_plan_matches, save_plan
from adatsq.recipe import Recipe, parse_budget

log = logging.getLogger(__name__)


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


def plan_calibration(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe, checked against the plan's sampler schedule: the checkpoint switches bits at the
    calibration's segment boundaries, so they must be the plan's."""
    cal = recipe.calibration
    if (cal.steps, cal.segments) != (plan.num_steps, len(plan.segments)):
        raise PlanError(
            f"the plan was made for {plan.num_steps} sampler steps in {len(plan.segments)} segments but the "
            f"recipe calibrates {cal.steps} steps in {cal.segments}; use the recipe the plan was made with"
        )
    expected = split_steps(cal.steps, cal.segments)
    if [tuple(s) for s in plan.segments] != expected:
        raise PlanError(
            f"the plan's segments {[list(s) for s in plan.segments]} are not the recipe's calibration "
            f"segments {[list(s) for s in expected]} ({cal.steps} steps in {cal.segments}); re-run "
            "`adatsq plan` with this recipe"
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
    adapter = adapter_for(model)
    layers = select_layers(adapter, recipe)  # checked against the plan before any calibration
    check_plan_matches(plan, list(layers), recipe.calibration.steps)
    if plan.model.get("fingerprint") not in (None, model_fingerprint(layers)):
        raise PlanError("the plan was made for a model with other layer shapes; re-plan for this model")
    calibration = calibrate(
        adapter, recipe, inputs, progress, known_weights=plan.fisher_weights, resume=resume
    )
    return finish(calibration, recipe, plan, progress)


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


def parse_sweep(values: str) -> list[float]:
    try:
        return [float(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep {values!r} must be comma-separated numbers, e.g. 3.5,4,4.5,5,6") from None


def sweep_budgets(planner: Planner, kind: str, values: str | None) -> list[Budget]:
    """Budgets of `kind` from a comma list, else 6 evenly spaced from the cheapest plan to all-max bits."""
    if values:
        return [Budget(kind, value) for value in parse_sweep(values)]
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
    progress: bool = True,
) -> str:
    """`adatsq plan`: search, write plan.json (+ heat map, Fisher plot), optionally a frontier."""
    budget = Budget(*parse_budget(budget_text)) if budget_text else recipe_budget(recipe)
    adapter = adapter_for(model)
    precheck_budget(adapter, recipe, budget)
    with adapter.repeated_sampling():  # every sampling of the run: calibration, search, frontier sweep
        planner = Planner.prepare(adapter, recipe, inputs, progress=progress, resume=resume)
        result = planner.search(budget)
        frontier = None
        if frontier_path is not None:
            budgets = sweep_budgets(planner, budget.kind, sweep_values)
            frontier = sweep(planner.problem, budgets, planner.config(), planner.meter, recipe.planner.search)
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
    if frontier is not None:
        save_frontier(frontier, frontier_path)
        if plot_path is not None:
            plot_frontier(frontier, plot_path)
        lines.append(f"wrote {frontier_path}: {len(frontier.points)} Pareto points")
    return "\n".join(lines)
