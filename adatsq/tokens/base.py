"""The token-reducer interface: what a reducer gets (tokens + context), what it returns, how it is found.

Every reducer, from G2TR to random pruning, maps N image tokens on a (h, w) grid to K <= N tokens and
says where each kept token sat and where every original token went. Adapters (Janus, BAGEL, the
reference UMM) only talk to this interface, so a new reducer is one registered class.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from adatsq.core.registry import Registry
from adatsq.errors import TokenReductionError

__all__ = [
    "REDUCERS",
    "Reduced",
    "ReductionContext",
    "TokenReducer",
    "check_grid",
    "get_reducer",
    "grid_positions",
    "keep_count",
    "reduced_from_kept",
]


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
    # "post_connector": after the vision connector, before position embedding + LM prefill;
    # "in_lm": inside the LM at a layer (needs attention / values captured there).
    stage: str
    needs: frozenset[str] = frozenset()  # ReductionContext fields that must not be None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.needs) - _CONTEXT_FIELDS
        assert not unknown, f"{cls.__name__}.needs names unknown context fields {sorted(unknown)}"

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, stage={self.stage!r})"


REDUCERS: Registry[type[TokenReducer]] = Registry("token reducer")


def get_reducer(name: str, **options: object) -> TokenReducer:
    """Instantiate a registered reducer; unknown names and options fail with the allowed values."""
    _register_builtins()
    cls = REDUCERS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise TokenReductionError(f"bad options {options} for reducer {name!r}: {err}") from err


def _register_builtins() -> None:
    """Importing the modules registers their reducers; done lazily so base.py has no cycle with them."""
    for module in ("adatsq.tokens.g2tr", "adatsq.tokens.baselines"):
        importlib.import_module(module)
