"""AdaTSQ plan search: a beam over timestep segments, plus the baselines that share its machinery.

Stage s assigns every layer its bits for segment s. Each partial path proposes a few cheap columns
from the error table (the next column of the table-optimal completion, the previous column again,
and allocations at several spend targets around the fair share of what is left), every extension is
scored on (cost so far, error so far), extensions whose cheapest completion breaks the budget are
dropped, dominated ones are pruned, and the `beam_width` best survive. Errors are measured
end-to-end by `measure` when given, else summed from the (Fisher-weighted) table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from adatsq.core.registry import Registry
from adatsq.errors import PlanError
from adatsq.plan.allocate import allocate, pareto_mask
from adatsq.plan.cost import act_bits_array, check_budget_feasible, fits, plan_costs, variant_bytes
from adatsq.plan.problem import Measure, PlanProblem, SearchConfig, SearchResult, StageStats
from adatsq.plan.schema import Budget, Plan

log = logging.getLogger(__name__)

SearchFn = Callable[[PlanProblem, Budget, SearchConfig, "Measure | None"], SearchResult]
METHODS: Registry[SearchFn] = Registry("plan search method")


class _Ledger:
    """Per-option costs in budget units: per segment for avg_bits/bops, per stored variant for bytes."""

    def __init__(self, problem: PlanProblem, kind: str, allowed: np.ndarray) -> None:
        layers, n_seg = problem.layers, problem.num_segments
        bits = np.array(problem.table_bits, dtype=np.float64)
        self.additive = kind != "bytes"
        if kind == "avg_bits":
            n = np.array([layer.n_params for layer in layers], dtype=np.float64)
            self.base = (n / (n_seg * n.sum()))[:, None] * bits[None, :]
        elif kind == "bops":
            macs = np.array([layer.macs_per_step for layer in layers], dtype=np.float64)
            self.base = (macs * act_bits_array(problem.act_bits, layers) / n_seg)[:, None] * bits[None, :]
        else:
            self.base = np.array(
                [[variant_bytes(lay, b) for b in problem.table_bits] for lay in layers], float
            )
        self.cheapest = np.where(allowed, self.base, np.inf).min(axis=1)  # [L]

    def stage_cost(self, used: np.ndarray) -> np.ndarray:
        """[L, B] cost of choosing each option in the next segment, given the variants already stored."""
        return self.base if self.additive else np.where(used, 0.0, self.base)

    def floor(self, used: np.ndarray, stages_left: int) -> float:
        """Cost of the cheapest completion of `stages_left` segments."""
        if stages_left == 0:
            return 0.0
        if self.additive:
            return stages_left * float(self.cheapest.sum())
        return float(self.cheapest[~used.any(axis=1)].sum())


@dataclasses.dataclass
class _Path:
    idx: np.ndarray  # [L, s] option indices into problem.table_bits
    cost: float  # budget cost of the segments so far
    used: np.ndarray  # [L, B] options already stored (bytes budget)
    proxy: float  # table error so far
    error: float = math.nan  # measured error when a measure is given, else proxy
    score: float = math.nan  # ranking key: error (+ completion estimate with lookahead)


class _Search:
    def __init__(self, problem: PlanProblem, budget: Budget, config: SearchConfig, measure: Measure | None):
        check_budget_feasible(
            problem.layers, budget, config.candidates, problem.num_segments, problem.act_bits, problem.pinned
        )
        self.problem, self.budget, self.config, self.measure = problem, budget, config, measure
        self.allowed = problem.allowed(config.candidates)
        self.ledger = _Ledger(problem, budget.kind, self.allowed)
        self.cap = budget.value * (1 + 1e-9)  # the same tolerance as cost.fits
        self.rows = np.arange(len(problem.layers))
        self.calls = 0

    def complete(self, path: _Path, first: int) -> np.ndarray:
        """Table-optimal option indices [L, S - first] for the remaining segments within the budget."""
        table, n_seg = self.problem.error_table, self.problem.num_segments
        left, cap = n_seg - first, self.cap - path.cost
        if self.ledger.additive:  # items are (layer, segment) pairs, all with the same per-segment costs
            err = table[:, first:, :].reshape(-1, table.shape[2])  # [L * left, B], layer-major
            cost, allowed = np.repeat(self.ledger.base, left, axis=0), np.repeat(self.allowed, left, axis=0)
            choice = allocate(err, cost, allowed, cap)
            assert choice is not None
            return choice.reshape(-1, left)
        # bytes: one more variant per layer at most, chosen on the summed error of the remaining segments
        err = table[:, first:, :].sum(axis=1)
        choice = allocate(err, self.ledger.stage_cost(path.used), self.allowed, cap)
        assert choice is not None
        return np.repeat(choice[:, None], left, axis=1)

    def proposals(self, path: _Path, s: int) -> list[np.ndarray]:
        """Candidate columns [L] of option indices for segment s."""
        n_seg, cfg = self.problem.num_segments, self.config
        cost = self.ledger.stage_cost(path.used)
        fixed = []
        if cfg.lookahead:
            fixed.append(self.complete(path, s)[:, 0])
        if s > 0:
            fixed.append(path.idx[:, -1])
        fixed = fixed[: cfg.proposals_per_stage]
        n_targets = cfg.proposals_per_stage - len(fixed)
        # Most this segment may spend (later segments at their cheapest), least it can, fair share between.
        cap = (
            self.cap
            - path.cost
            - (self.ledger.floor(path.used, n_seg - s - 1) if self.ledger.additive else 0.0)
        )
        low = float(np.where(self.allowed, cost, np.inf).min(axis=1).sum())
        spread = cfg.target_spread
        multipliers = np.geomspace(1 / spread, spread, n_targets) if n_targets > 1 else np.ones(n_targets)
        targets = [low + min(m / (n_seg - s), 1.0) * max(cap - low, 0.0) for m in multipliers]
        err = self.problem.error_table[:, s, :]
        columns = fixed + [allocate(err, cost, self.allowed, target) for target in targets]
        unique: dict[bytes, np.ndarray] = {}
        for column in columns:
            if column is not None:
                unique.setdefault(column.tobytes(), column)
        return list(unique.values())

    def extend(self, path: _Path, column: np.ndarray, s: int) -> _Path:
        used = path.used.copy()
        used[self.rows, column] = True
        return _Path(
            idx=np.concatenate([path.idx, column[:, None]], axis=1),
            cost=path.cost + float(self.ledger.stage_cost(path.used)[self.rows, column].sum()),
            used=used,
            proxy=path.proxy + float(self.problem.error_table[self.rows, s, column].sum()),
        )

    def measured(self, idx: np.ndarray) -> float:
        self.calls += 1
        value = float(self.measure(self.problem.partial_plan(idx)))
        if not math.isfinite(value):
            raise PlanError(
                f"measure returned {value} for a plan covering segments 0..{idx.shape[1] - 1}; "
                "it must return a finite MSE against the full-precision trajectory"
            )
        return value

    def rank(self, path: _Path, s: int) -> float:
        """Error so far, plus (with lookahead) the table's best completion scaled to the error's units."""
        if not self.config.lookahead or s == self.problem.num_segments - 1:
            return path.error
        rest = self.complete(path, s + 1)
        s_idx = np.arange(s + 1, self.problem.num_segments)
        estimate = float(self.problem.error_table[self.rows[:, None], s_idx[None, :], rest].sum())
        scale = path.error / path.proxy if self.measure is not None and path.proxy > 0 else 1.0
        return path.error + scale * estimate

    def run(self) -> tuple[np.ndarray, float | None, list[StageStats]]:
        n_layers, n_opts = self.allowed.shape
        beam = [_Path(np.zeros((n_layers, 0), dtype=np.int64), 0.0, np.zeros((n_layers, n_opts), bool), 0.0)]
        stats = []
        for s in range(self.problem.num_segments):
            calls_before, paths_in = self.calls, len(beam)
            extended: dict[bytes, _Path] = {}
            for path in beam:
                for column in self.proposals(path, s):
                    child = self.extend(path, column, s)
                    extended.setdefault(child.idx.tobytes(), child)
            left = self.problem.num_segments - s - 1
            feasible = [p for p in extended.values() if p.cost + self.ledger.floor(p.used, left) <= self.cap]
            for path in feasible:
                path.error = self.measured(path.idx) if self.measure is not None else path.proxy
            keep = pareto_mask([p.cost for p in feasible], [p.error for p in feasible])
            survivors = [p for p, k in zip(feasible, keep, strict=True) if k or not self.config.pareto_prune]
            for path in survivors:
                path.score = self.rank(path, s)
            beam = sorted(survivors, key=lambda p: (p.score, p.cost))[: self.config.beam_width]
            dropped = len(extended) - len(feasible)
            stats.append(
                StageStats(
                    s,
                    paths_in,
                    len(extended),
                    dropped,
                    len(feasible) - len(survivors),
                    len(beam),
                    self.calls - calls_before,
                )
            )
            log.debug("segment %d: %s", s, stats[-1])
        best = min(beam, key=lambda p: (p.error, p.cost))
        return best.idx, (best.error if self.measure is not None else None), stats


def _result(
    problem: PlanProblem,
    idx: np.ndarray,
    method: str,
    candidates: tuple[int, ...],
    budget: Budget | None,
    measured: float | None,
    started: float,
    calls: int,
    stages: tuple[StageStats, ...] = (),
) -> SearchResult:
    bits = problem.to_bits(idx)
    costs = plan_costs(bits, problem.layers, problem.act_bits)
    assert budget is None or fits(costs[budget.kind], budget), f"{method} plan over budget: {costs}, {budget}"
    plan = Plan(
        layers={n: tuple(row) for n, row in zip(problem.names, bits.tolist(), strict=True)},
        segments=list(problem.segments),
        num_steps=problem.num_steps,
        act_bits=problem.act_bits,
        candidates=candidates,
        fisher_weights=list(problem.fisher_weights),
        model=dict(problem.model),
        budget=budget,
        metrics={**costs, "proxy_error": problem.proxy_error(idx), "measured_error": measured},
        fisher_method=problem.fisher_method,
    )
    return SearchResult(plan, method, time.perf_counter() - started, calls, stages)


def _beam(problem: PlanProblem, budget: Budget, config: SearchConfig, measure: Measure | None, method: str):
    started = time.perf_counter()
    search = _Search(problem, budget, config, measure)
    idx, measured, stages = search.run()
    calls = search.calls
    return _result(problem, idx, method, config.candidates, budget, measured, started, calls, tuple(stages))


@METHODS.register("beam")
def beam_search(
    problem: PlanProblem,
    budget: Budget,
    config: SearchConfig | None = None,
    measure: Measure | None = None,
) -> SearchResult:
    """AdaTSQ: timestep-adaptive bits per layer and segment under `budget` (see module docstring)."""
    return _beam(problem, budget, config or SearchConfig(), measure, "beam")


@METHODS.register("greedy")
def greedy_plan(
    problem: PlanProblem,
    budget: Budget,
    config: SearchConfig | None = None,
    measure: Measure | None = None,
) -> SearchResult:
    """Ablation without a beam: keep only the best proposal at each stage."""
    return _beam(
        problem, budget, dataclasses.replace(config or SearchConfig(), beam_width=1), measure, "greedy"
    )


def _measure_full(problem: PlanProblem, idx: np.ndarray, measure: Measure | None) -> float | None:
    if measure is None:
        return None
    value = float(measure(problem.partial_plan(idx)))
    if not math.isfinite(value):
        raise PlanError(f"measure returned {value} for a complete plan; it must return a finite MSE")
    return value


@METHODS.register("static")
def static_plan(
    problem: PlanProblem,
    budget: Budget,
    config: SearchConfig | None = None,
    measure: Measure | None = None,
) -> SearchResult:
    """Timestep-agnostic mixed precision (MixDQ/HAWQ style): one bit-width per layer for every segment,
    allocated by Lagrangian + greedy marginal gain on Σ_s E[l, s, b]."""
    started, config = time.perf_counter(), config or SearchConfig()
    check_budget_feasible(
        problem.layers, budget, config.candidates, problem.num_segments, problem.act_bits, problem.pinned
    )
    allowed = problem.allowed(config.candidates)
    ledger = _Ledger(problem, budget.kind, allowed)
    row_cost = ledger.base * (problem.num_segments if ledger.additive else 1)
    choice = allocate(problem.error_table.sum(axis=1), row_cost, allowed, budget.value * (1 + 1e-9))
    assert choice is not None
    idx = np.repeat(choice[:, None], problem.num_segments, axis=1)
    measured, calls = _measure_full(problem, idx, measure), int(measure is not None)
    return _result(problem, idx, "static", config.candidates, budget, measured, started, calls)


def uniform_plan(problem: PlanProblem, bits: int, measure: Measure | None = None) -> SearchResult:
    """Every free layer at `bits` in every segment (pinned layers keep their pin); no budget."""
    started = time.perf_counter()
    allowed = problem.allowed((int(bits),))
    idx = np.repeat(allowed.argmax(axis=1)[:, None], problem.num_segments, axis=1)
    measured = _measure_full(problem, idx, measure)
    return _result(problem, idx, "uniform", (int(bits),), None, measured, started, int(measure is not None))
