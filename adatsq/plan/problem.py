"""The search's inputs and outputs: what the lead hands over (layers, error table, sampler) and gets back."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adatsq.errors import ConfigError, PlanError
from adatsq.plan.cost import act_bits_array
from adatsq.plan.schema import SUPPORTED_BITS, LayerInfo, PartialPlan, Plan, validate_segments

# Measured end-to-end error of a partial plan (segments 0..last quantized, the rest full precision):
# MSE of the quantized trajectory against the full-precision one at the end of the last segment.
Measure = Callable[[PartialPlan], float]


@dataclass(frozen=True, eq=False)
class PlanProblem:
    """Everything fixed across searches on one model and sampler.

    `error_table[l, s, b]` must already carry the segment's Fisher weight:
    E[l, s, b] = w_s · tr((W_l − Q_b(W_l)) H_{l,s} (W_l − Q_b(W_l))ᵀ), b indexing `table_bits`.
    """

    layers: Sequence[LayerInfo]
    error_table: np.ndarray  # [L, S, B], Fisher-weighted (see above); non-negative in practice
    table_bits: Sequence[int]  # bit-width of each slice of the table's last axis, ascending
    segments: Sequence[tuple[int, int]]  # sampler step ranges [start, end), one per table segment
    fisher_weights: Sequence[float]  # normalised per-segment weights (recorded in the plan)
    model: Mapping[str, str]  # {"family": ..., "fingerprint": ...}, recorded in the plan
    act_bits: int | Mapping[str, int] = 8  # activation bits (16 = not quantized), one or per layer
    pinned: Mapping[str, int] = field(default_factory=dict)  # layer -> bits every search must keep
    fisher_method: str = "uniform"  # how fisher_weights were estimated (recorded in the plan)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers or not all(isinstance(layer, LayerInfo) for layer in layers):
            raise PlanError("layers must be a non-empty list of LayerInfo")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise PlanError(f"layer names must be unique; repeated: {repeated[:10]}")
        table = np.asarray(self.error_table, dtype=np.float64)
        bits = tuple(int(b) for b in self.table_bits)
        if not bits or list(bits) != sorted(set(bits)) or not set(bits) <= set(SUPPORTED_BITS):
            raise PlanError(
                f"table_bits must be ascending unique bits from {list(SUPPORTED_BITS)}, got {bits}"
            )
        segments = list(self.segments)
        segments = validate_segments(segments, segments[-1][1] if segments else 0, "problem")
        expected = (len(layers), len(segments), len(bits))
        if table.shape != expected:
            raise PlanError(f"error_table has shape {table.shape}; expected [L, S, B] = {expected}")
        if not np.isfinite(table).all():
            raise PlanError("error_table has NaN/inf entries; check the Hessians of those layers")
        if len(self.fisher_weights) != len(segments):
            raise PlanError(f"fisher_weights has {len(self.fisher_weights)} values; need {len(segments)}")
        pinned = {str(k): int(v) for k, v in dict(self.pinned).items()}
        unknown = sorted(set(pinned) - set(names))
        if unknown:
            raise PlanError(f"pinned layers {unknown[:10]} are not among the planned layers; check the names")
        off_table = {k: v for k, v in pinned.items() if v not in bits}
        if off_table:
            raise PlanError(
                f"pinned bits {off_table} are not in table_bits {list(bits)}; add them to the table"
            )
        act = act_bits_array(self.act_bits, layers).tolist()
        act_bits = dict(zip(names, act, strict=True)) if isinstance(self.act_bits, Mapping) else act[0]
        for attr, value in (
            ("layers", layers),
            ("error_table", table),
            ("table_bits", bits),
            ("segments", segments),
            ("fisher_weights", tuple(float(w) for w in self.fisher_weights)),
            ("model", dict(self.model)),
            ("act_bits", act_bits),
            ("pinned", pinned),
        ):
            object.__setattr__(self, attr, value)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def num_steps(self) -> int:
        return self.segments[-1][1]

    def allowed(self, candidates: Sequence[int]) -> np.ndarray:
        """[L, B] mask of the options each layer may take: its pin, else the candidates."""
        missing = sorted(set(candidates) - set(self.table_bits))
        if missing:
            raise PlanError(
                f"candidate bits {missing} have no column in the error table (table_bits "
                f"{list(self.table_bits)}); compute the table for them or drop them from the candidates"
            )
        bits = np.array(self.table_bits)
        free = np.isin(bits, list(candidates))
        return np.array([bits == self.pinned[n] if n in self.pinned else free for n in self.names])

    def to_bits(self, idx: np.ndarray) -> np.ndarray:
        """Option indices [L, s] → bit-widths [L, s]."""
        return np.array(self.table_bits, dtype=np.int64)[idx]

    def partial_plan(self, idx: np.ndarray) -> PartialPlan:
        rows = self.to_bits(idx).tolist()
        return PartialPlan(
            bits={n: tuple(r) for n, r in zip(self.names, rows, strict=True)},
            act_bits=self.act_bits,
            segments=self.segments,
        )

    def proxy_error(self, idx: np.ndarray) -> float:
        """Σ_l Σ_s E[l, s, idx[l, s]] over the segments idx covers."""
        s = np.arange(idx.shape[1])
        return float(self.error_table[np.arange(len(self.layers))[:, None], s[None, :], idx].sum())


@dataclass(frozen=True)
class SearchConfig:
    """Beam search settings (AdaTSQ): stages are timestep segments, proposals are per-stage allocations."""

    beam_width: int = 4
    proposals_per_stage: int = 6  # per path: lookahead + same-as-previous + budget-target allocations
    candidates: tuple[int, ...] = (3, 4, 6, 8)
    pareto_prune: bool = True  # drop partial paths another path beats on both cost and error so far
    # Rank partial paths by error so far + the table's estimate of their best completion (and propose
    # that completion's next column). False ranks by error so far only (the ablation).
    lookahead: bool = True
    target_spread: float = 2.0  # per-stage spend targets span fair_share / spread .. fair_share * spread

    def __post_init__(self) -> None:
        for attr in ("beam_width", "proposals_per_stage"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SearchConfig.{attr} must be an integer >= 1, got {value!r}")
        candidates = tuple(self.candidates)
        if (
            not candidates
            or list(candidates) != sorted(set(candidates))
            or not set(candidates) <= set(SUPPORTED_BITS)
        ):
            raise ConfigError(
                f"SearchConfig.candidates must be ascending unique bits from {list(SUPPORTED_BITS)}, "
                f"got {candidates}"
            )
        object.__setattr__(self, "candidates", candidates)
        if not self.target_spread >= 1.0:
            raise ConfigError(f"SearchConfig.target_spread must be >= 1, got {self.target_spread!r}")


@dataclass(frozen=True)
class StageStats:
    """What happened at one stage of a search (for reports and tests)."""

    segment: int
    paths_in: int
    candidates: int  # distinct extended paths proposed
    infeasible: int  # dropped: the cheapest completion would exceed the budget
    dominated: int  # dropped by Pareto pruning
    kept: int
    measure_calls: int


@dataclass(frozen=True)
class SearchResult:
    plan: Plan
    method: str
    search_seconds: float
    measure_calls: int
    stages: tuple[StageStats, ...] = ()

    @property
    def metrics(self) -> dict[str, Any]:
        """avg_bits, bops, bytes, proxy_error, measured_error (None without a measure callback)."""
        return self.plan.metrics
