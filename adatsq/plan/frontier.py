"""Budget sweeps: one search per budget, kept as a Pareto frontier (cost vs error) in frontier.json."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from adatsq.core.io import atomic_write_text
from adatsq.core.progress import tqdm_disable
from adatsq.errors import PlanError
from adatsq.plan.allocate import pareto_mask
from adatsq.plan.beam import METHODS
from adatsq.plan.problem import Measure, PlanProblem, SearchConfig, SearchResult
from adatsq.plan.schema import (
    BUDGET_KINDS,
    FORMAT_VERSION,
    Budget,
    Plan,
    as_float,
    as_int,
    check_keys,
    check_version,
    dumps_json,
    read_json,
)

log = logging.getLogger(__name__)

ERROR_METRICS = ("measured_error", "proxy_error")


@dataclass(frozen=True)
class FrontierPoint:
    """One searched plan; `budget` and `metrics` repeat the plan's own for readers of frontier.json."""

    plan: Plan
    search_seconds: float
    measure_calls: int

    @property
    def budget(self) -> Budget | None:
        return self.plan.budget

    @property
    def metrics(self) -> dict[str, Any]:
        return self.plan.metrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": None if self.budget is None else self.budget.to_dict(),
            "metrics": dict(self.metrics),
            "search_seconds": self.search_seconds,
            "measure_calls": self.measure_calls,
            "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> FrontierPoint:
        check_keys(data, {"budget", "metrics", "search_seconds", "measure_calls", "plan"}, where)
        plan = Plan.from_dict(data["plan"], f"{where}.plan")
        if data["budget"] != plan.to_dict()["budget"] or data["metrics"] != plan.metrics:
            raise PlanError(
                f"{where}: budget/metrics differ from its plan's; the file was edited, regenerate it"
            )
        return cls(
            plan,
            as_float(data["search_seconds"], f"{where}.search_seconds"),
            as_int(data["measure_calls"], where),
        )


@dataclass(frozen=True)
class Frontier:
    """Non-dominated plans sorted by cost (`kind`): each costs more and errs strictly less than the last."""

    kind: str  # budget kind the points are ordered by
    method: str  # search that made them ("beam", "static", "uniform", ...)
    error_metric: str  # "measured_error" when every point was measured, else "proxy_error"
    points: tuple[FrontierPoint, ...]
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if as_int(self.format_version, "frontier.format_version") != FORMAT_VERSION:
            raise PlanError(
                f"frontier format_version {self.format_version} is not supported (this adatsq reads "
                f"{FORMAT_VERSION}); re-run the sweep with this version"
            )
        if self.kind not in BUDGET_KINDS or self.error_metric not in ERROR_METRICS:
            raise PlanError(
                f"frontier kind {self.kind!r} / error_metric {self.error_metric!r} unknown; allowed: "
                f"{list(BUDGET_KINDS)} / {list(ERROR_METRICS)}"
            )
        points = tuple(self.points)
        if not points:
            raise PlanError("a frontier needs at least one point")
        costs, errors = self.costs(points), self.errors(points)
        for i in range(1, len(points)):
            if not (costs[i] > costs[i - 1] and errors[i] < errors[i - 1]):
                raise PlanError(
                    f"frontier point {i} ({self.kind}={costs[i]}, {self.error_metric}={errors[i]}) does "
                    f"not cost more and err less than point {i - 1} ({costs[i - 1]}, {errors[i - 1]}); "
                    "build frontiers with build_frontier(), which drops dominated plans"
                )
        object.__setattr__(self, "points", points)

    def costs(self, points: Sequence[FrontierPoint] | None = None) -> list[float]:
        return [float(p.metrics[self.kind]) for p in (self.points if points is None else points)]

    def errors(self, points: Sequence[FrontierPoint] | None = None) -> list[float]:
        values = [p.metrics.get(self.error_metric) for p in (self.points if points is None else points)]
        if any(v is None for v in values):
            raise PlanError(f"frontier points lack {self.error_metric!r}; use error_metric='proxy_error'")
        return [float(v) for v in values]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "method": self.method,
            "error_metric": self.error_metric,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "frontier") -> Frontier:
        check_version(data, where)
        check_keys(data, {"format_version", "kind", "method", "error_metric", "points"}, where)
        if not isinstance(data["points"], list):
            raise PlanError(f"{where}.points must be a list of points")
        points = tuple(
            FrontierPoint.from_dict(p, f"{where}.points[{i}]") for i, p in enumerate(data["points"])
        )
        return cls(data["kind"], data["method"], data["error_metric"], points, data["format_version"])


def build_frontier(results: Sequence[SearchResult], kind: str, method: str | None = None) -> Frontier:
    """Keep the non-dominated results on (cost `kind`, error), sorted by cost."""
    if not results:
        raise PlanError("no search results to build a frontier from")
    measured = all(r.metrics.get("measured_error") is not None for r in results)
    metric = "measured_error" if measured else "proxy_error"
    costs = [float(r.metrics[kind]) for r in results]
    errors = [float(r.metrics[metric]) for r in results]
    keep = pareto_mask(costs, errors)
    order = sorted((i for i in range(len(results)) if keep[i]), key=lambda i: costs[i])
    points = tuple(
        FrontierPoint(results[i].plan, results[i].search_seconds, results[i].measure_calls) for i in order
    )
    return Frontier(kind, method or results[0].method, metric, points)


def sweep(
    problem: PlanProblem,
    budgets: Sequence[Budget],
    config: SearchConfig | None = None,
    measure: Measure | None = None,
    method: str = "beam",
    progress: bool = False,
) -> Frontier:
    """Run `method` ("beam", "greedy", "static") once per budget and keep the Pareto frontier."""
    kinds = {b.kind for b in budgets}
    if len(kinds) != 1:
        raise PlanError(f"a sweep needs budgets of one kind, got {sorted(kinds)}; sweep each kind separately")
    search = METHODS.get(method)
    results = []
    for budget in tqdm(budgets, desc=f"{method} sweep", disable=tqdm_disable(progress)):
        results.append(search(problem, budget, config, measure))
        log.info("%s %s: %s in %.2fs", method, budget, results[-1].metrics, results[-1].search_seconds)
    return build_frontier(results, kinds.pop(), method)


def save_frontier(frontier: Frontier, path: str | os.PathLike[str]) -> Path:
    """Write frontier.json atomically."""
    return atomic_write_text(path, dumps_json(frontier.to_dict()))


def load_frontier(path: str | os.PathLike[str]) -> Frontier:
    """Read and validate frontier.json (every plan inside is validated like plan.json)."""
    return Frontier.from_dict(read_json(path, "frontier"), where=str(path))
