"""Bit-width plans for timestep-adaptive quantization: costs, the AdaTSQ beam search, frontiers, plan files.

Pure numpy: the orchestrator (adatsq.engine.adaptive) builds the error table and the measure callback.
Plots live in adatsq.plan.plots and the `inspect` summaries in adatsq.plan.inspect (imported on demand).
"""

from adatsq.plan.beam import METHODS, beam_search, greedy_plan, static_plan, uniform_plan
from adatsq.plan.cost import (
    avg_bits,
    bops,
    budget_cost,
    cheapest_plan_cost,
    check_budget_feasible,
    plan_costs,
    stored_bytes,
    variant_bytes,
)
from adatsq.plan.frontier import Frontier, FrontierPoint, build_frontier, load_frontier, save_frontier, sweep
from adatsq.plan.problem import Measure, PlanProblem, SearchConfig, SearchResult, StageStats
from adatsq.plan.schema import (
    ACT_BITS,
    SUPPORTED_BITS,
    Budget,
    LayerInfo,
    PartialPlan,
    Plan,
    check_plan_matches,
    load_plan,
    save_plan,
)

__all__ = [
    "ACT_BITS",
    "METHODS",
    "SUPPORTED_BITS",
    "Budget",
    "Frontier",
    "FrontierPoint",
    "LayerInfo",
    "Measure",
    "PartialPlan",
    "Plan",
    "PlanProblem",
    "SearchConfig",
    "SearchResult",
    "StageStats",
    "avg_bits",
    "beam_search",
    "bops",
    "budget_cost",
    "build_frontier",
    "cheapest_plan_cost",
    "check_budget_feasible",
    "check_plan_matches",
    "greedy_plan",
    "load_frontier",
    "load_plan",
    "plan_costs",
    "save_frontier",
    "save_plan",
    "static_plan",
    "stored_bytes",
    "sweep",
    "uniform_plan",
    "variant_bytes",
]
