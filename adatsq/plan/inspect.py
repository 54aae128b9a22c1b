"""Human-readable summaries of plan.json and frontier.json (for `adatsq inspect`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from adatsq.core.tables import table
from adatsq.plan.frontier import Frontier
from adatsq.plan.schema import Plan, read_json


def _number(value: object) -> str:
    return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def describe_plan(plan: Plan) -> str:
    rows = [
        [name, " ".join(map(str, row)), ",".join(map(str, plan.variants(name)))]
        for name, row in plan.layers.items()
    ]
    budget = "none" if plan.budget is None else f"{plan.budget.kind} <= {plan.budget.value:.6g}"
    metrics = ", ".join(f"{k}={_number(v)}" for k, v in plan.metrics.items())
    summary = (
        f"plan for {plan.model.get('family')!r} ({plan.model.get('fingerprint')}): {len(rows)} layers, "
        f"{plan.num_segments} segments {plan.segments} over {plan.num_steps} steps, act bits "
        f"{plan.act_bits if isinstance(plan.act_bits, int) else 'per layer'}, budget {budget}\n{metrics}"
    )
    return table(["layer", "bits/segment", "variants"], rows) + "\n" + summary


def describe_frontier(frontier: Frontier) -> str:
    costs, errors = frontier.costs(), frontier.errors()
    rows = [
        [str(i), _number(cost), _number(error), _number(p.search_seconds), str(p.measure_calls)]
        for i, (p, cost, error) in enumerate(zip(frontier.points, costs, errors, strict=True))
    ]
    header = ["point", frontier.kind, frontier.error_metric, "search s", "measure calls"]
    return table(header, rows) + f"\n{frontier.method} frontier, {len(rows)} non-dominated plans"


def inspect_plan_file(path: str | os.PathLike[str]) -> str:
    """plan.json or frontier.json (told apart by its keys), validated, as a table."""
    data = read_json(path, "plan")
    if isinstance(data, Mapping) and "points" in data:
        return describe_frontier(Frontier.from_dict(data, where=str(path)))
    return describe_plan(Plan.from_dict(data, where=str(path)))
