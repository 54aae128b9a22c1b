"""The token-reducer interface: what a reducer gets (tokens + context), what it returns, how it is found.

Every reducer, from G2TR to random pruning, maps N image tokens on a (h, w) grid to K <= N tokens and
says where each kept token sat and where every original token went. Adapters (Janus, BAGEL, the
reference UMM) and the cost model only talk to this interface — where a reducer runs (`stage`), what it
reads (`needs`), whether it can run on generation tokens (`supports_generation`), what it costs
(`overhead_flops`) and, for in-LM reducers, where and how it prunes (`InLMReducer.stage_plan`,
`InLMReducer.prune`) — so a new reducer is one registered class. The built-in reducers are registered
when the `adatsq.tokens` package is imported (it imports `g2tr` and `baselines`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from adatsq.core.registry import Registry
from adatsq.errors import TokenReductionError

__all__ = [
    "IN_LM",
    "POST_CONNECTOR",
    "REDUCERS",
    "InLMReducer",
    "Reduced",
    "ReductionContext",
    "TokenReducer",
    "check_grid",
    "get_reducer",
    "grid_positions",
    "keep_count",
    "reduced_from_kept",
    "reducer_names",
]

POST_CONNECTOR = "post_connector"  # after the vision connector, before position embedding + LM prefill
IN_LM = "in_lm"  # inside the LM at a layer (needs attention / values captured there)


@dataclass(frozen=True)
class Reduced:
    """The result of one reduction.

    `tokens[j]` sits at `positions[j]` of the original grid (its source token `kept_index[j]`);
    `assignment[i]` is the slot original token i was merged into, -1 when it was dropped (pruning).
    """

    tokens: Tensor  # [K, D] reduced (merged) tokens, ordered by ascending kept_index
    kept_index: Tensor  # LongTensor [K] ascending indices into the original N tokens
    positions: Tensor  # LongTensor [K, 2] (row, col) of each kept token in the original ViT grid
    assignment: Tensor  # LongTensor [N]: slot (0..K-1) of each original token; -1 if dropped

    @property
    def k(self) -> int:
        return int(self.kept_index.numel())

    @property
    def n(self) -> int:
        return int(self.assignment.numel())


@dataclass
class ReductionContext:
    """Everything besides the tokens a reducer may need; a reducer lists the fields it reads in `needs`."""

    grid: tuple[int, int]  # understanding (ViT) token grid (h, w); N must equal h*w
    keep: float  # keep ratio in (0, 1]
    min_keep: int = 1
    anchors: Tensor | None = None  # [M, D] generation-latent anchors, row-major over latent_grid (G2TR)
    latent_grid: tuple[int, int] | None = None
    # [N] attention each image token receives (FastV/PDrop: from the last text token at layer K;
    # VisionZip: mean over queries and heads)
    attention: Tensor | None = None
    values: Tensor | None = None  # [N, Dv] value vectors of the image tokens at an early LM layer (V-norm)
    generator: torch.Generator | None = None  # random baseline

    def __post_init__(self) -> None:
        self.grid = _check_hw(self.grid, "grid")
        if self.latent_grid is not None:
            self.latent_grid = _check_hw(self.latent_grid, "latent_grid")
        _check_keep(self.keep)
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise TokenReductionError(f"min_keep must be an integer >= 1, got {self.min_keep!r}")

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]


def _check_hw(grid: object, name: str) -> tuple[int, int]:
    try:
        h, w = grid  # type: ignore[misc]
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TokenReductionError(f"{name} must be two positive integers (rows, cols), got {grid!r}")
    return int(h), int(w)


def _check_keep(keep: float) -> None:
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0.0 < float(keep) <= 1.0:
        raise TokenReductionError(f"keep ratio must be in (0, 1], got {keep!r}; e.g. keep=0.5 keeps half")


def keep_count(n: int, keep: float, min_keep: int = 1) -> int:
    """K = clamp(round(N·keep), min_keep, N), rounding halves up (so 1369·0.5 -> 685, not banker's 684)."""
    _check_keep(keep)
    if n < 1:
        raise TokenReductionError(f"cannot reduce {n} tokens; an image must give at least one token")
    if min_keep < 1:
        raise TokenReductionError(f"min_keep must be >= 1, got {min_keep}")
    if min_keep > n:
        raise TokenReductionError(
            f"min_keep={min_keep} exceeds the {n} image tokens; lower min_keep to at most {n}"
        )
    return max(min_keep, min(n, math.floor(n * float(keep) + 0.5)))


def check_grid(tokens: Tensor, grid: tuple[int, int]) -> None:
    """Tokens must be [N, D] with N = h·w of the grid they are said to come from."""
    if tokens.dim() != 2:
        raise TokenReductionError(f"tokens must be [N, D], got shape {tuple(tokens.shape)}")
    h, w = grid
    if tokens.shape[0] != h * w:
        raise TokenReductionError(
            f"{tokens.shape[0]} tokens do not fill grid {h}x{w} (= {h * w}); pass the grid of this image"
        )


def grid_positions(index: Tensor, grid: tuple[int, int]) -> Tensor:
    """(row, col) of row-major flat indices on a (h, w) grid, as LongTensor [K, 2]."""
    w = grid[1]
    index = index.long()
    return torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=1)


def reduced_from_kept(
    tokens: Tensor,
    kept: Tensor,
    grid: tuple[int, int],
    merged: Tensor | None = None,
    assignment: Tensor | None = None,
) -> Reduced:
    """Build a `Reduced` from ascending kept indices; without `merged`, it is pure pruning (others -> -1)."""
    kept = kept.long()
    if assignment is None:
        assignment = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=tokens.device)
        assignment[kept] = torch.arange(kept.numel(), device=tokens.device)
    return Reduced(
        tokens=tokens[kept] if merged is None else merged,
        kept_index=kept,
        positions=grid_positions(kept, grid),
        assignment=assignment,
    )


_CONTEXT_FIELDS = frozenset(f.name for f in fields(ReductionContext))


class TokenReducer(ABC):
    """Maps [N, D] image tokens to a `Reduced` of K tokens; `reduce` validates, `_reduce` does the work."""

    name: str
    stage: str = POST_CONNECTOR  # POST_CONNECTOR or IN_LM (then subclass `InLMReducer`)
    needs: frozenset[str] = frozenset()  # ReductionContext fields that must not be None
    # can run on generation (latent) tokens when an experiment forces it: a latent token has itself and
    # the generation anchors, but no question or ViT attention and no LM values
    supports_generation: bool = False
    # model measurements `overhead_flops` needs (keyword arguments the caller must supply)
    overhead_inputs: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.needs) - _CONTEXT_FIELDS
        assert not unknown, f"{cls.__name__}.needs names unknown context fields {sorted(unknown)}"
        assert cls.stage in (POST_CONNECTOR, IN_LM), f"{cls.__name__}.stage {cls.stage!r} is unknown"

    def reduce(self, tokens: Tensor, context: ReductionContext) -> Reduced:
        check_grid(tokens, context.grid)
        for field in sorted(self.needs):
            if getattr(context, field) is None:
                raise TokenReductionError(
                    f"reducer {self.name!r} needs context.{field}, which is missing; the model's "
                    f"attention backend/adapter must expose it"
                    + (" (use attn_implementation='eager')" if field == "attention" else "")
                )
        k = keep_count(tokens.shape[0], context.keep, context.min_keep)
        return self._reduce(tokens, context, k)

    @abstractmethod
    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        """Reduce validated tokens to exactly k."""

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """FLOPs this reducer adds on top of the (reduced) LM prefill, for one image of n tokens of width d
        reduced to k; `inputs` are the model measurements named in `overhead_inputs`. Default: none."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, stage={self.stage!r})"


class InLMReducer(TokenReducer):
    """A reducer that prunes image tokens inside the LM: layers before its first pruning layer run on every
    token. Subclasses set `layer` (the first layer that runs on the kept tokens) or override `_boundaries`;
    adapters capture what `needs` names at the layer before each boundary and call `prune`."""

    stage = IN_LM
    layer: int

    def _boundaries(self, n: int, n_layers: int, keep: float, min_keep: int) -> list[tuple[int, int]]:
        return [(self.layer, keep_count(n, keep, min_keep))]

    def stage_plan(self, n: int, n_layers: int, keep: float, min_keep: int = 1) -> list[tuple[int, int]]:
        """[(layer, image tokens kept from that layer on)] on n image tokens of an n_layers-layer LM."""
        plan = self._boundaries(n, n_layers, keep, min_keep)
        if any(not 1 <= first < n_layers for first, _ in plan):
            raise TokenReductionError(
                f"{self.name} prunes at layers {[f for f, _ in plan]}, allowed 1..{n_layers - 1} "
                f"(pruning before layer 1 is the same as a post-connector reducer)"
            )
        return plan

    def prune(self, tokens: Tensor, context: ReductionContext, count: int) -> Tensor:
        """Ascending indices (into the alive image `tokens`) of the `count` tokens that survive one
        boundary of `stage_plan`, from the signals captured before it (`context`)."""
        reduced = self.reduce(tokens, context)
        assert reduced.k == count, (reduced.k, count)
        return reduced.kept_index


REDUCERS: Registry[type[TokenReducer]] = Registry("token reducer")


def get_reducer(name: str, **options: object) -> TokenReducer:
    """Instantiate a registered reducer; unknown names and options fail with the allowed values."""
    cls = REDUCERS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise TokenReductionError(f"bad options {options} for reducer {name!r}: {err}") from err


def reducer_names(stage: str | None = None, supports_generation: bool | None = None) -> list[str]:
    """Registered reducer names (sorted), optionally only those of a stage / able to run on generation."""
    return [
        name
        for name in REDUCERS.names()
        if (stage is None or REDUCERS.get(name).stage == stage)
        and (supports_generation is None or REDUCERS.get(name).supports_generation == supports_generation)
    ]
