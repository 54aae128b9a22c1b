"""Baseline token reducers G2TR is compared with: V-norm, FastV, PDrop, VisionZip, ToMe, random, grid.

Each is the published rule reduced to what it does to the image tokens; where a method needs model
internals (attention, value vectors), the adapter captures them and passes them in the context.
Every reducer keeps exactly K = keep_count(N, keep, min_keep) tokens; ties go to the lower index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adatsq.errors import TokenReductionError
from adatsq.tokens.base import (
    POST_CONNECTOR,
    REDUCERS,
    InLMReducer,
    Reduced,
    ReductionContext,
    TokenReducer,
    reduced_from_kept,
)

__all__ = [
    "FastV",
    "GridPool",
    "PDrop",
    "RandomDrop",
    "ToMe",
    "VNorm",
    "VisionZip",
    "pdrop_schedule",
    "pdrop_stage_ratio",
    "prune_stage",
    "top_k",
]


def top_k(score: Tensor, k: int) -> Tensor:
    """Ascending indices of the k highest scores (ties to the lower index)."""
    order = torch.sort(score.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _check_vector(x: Tensor, n: int, field: str) -> None:
    if x.dim() != 1 or x.numel() != n:
        raise TokenReductionError(
            f"context.{field} must be [N={n}] (one score per image token), got {tuple(x.shape)}"
        )


@REDUCERS.register("vnorm")
class VNorm(InLMReducer):
    """FlashU's V-norm proxy: keep the K image tokens whose value vectors are longest.

    Exact rule: score_i = ||v_i||_2, where v_i is image token i's value vector (all KV heads
    concatenated, [N, Dv]) produced by the value projection of LM layer `layer` during prefill;
    keep the top K by score, drop the rest at that layer. Unlike attention scores this needs no
    attention matrix, so it works with fused attention kernels.
    """

    name = "vnorm"
    needs = frozenset({"values"})
    overhead_inputs = frozenset({"dv"})

    def __init__(self, layer: int = 2) -> None:
        self.layer = int(layer)

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """Value norms of the n image tokens (`dv` value channels, default d)."""
        return 2 * n * inputs.get("dv", d)

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        assert context.values is not None
        values = context.values
        if values.dim() != 2 or values.shape[0] != tokens.shape[0]:
            raise TokenReductionError(
                f"context.values must be [N={tokens.shape[0]}, Dv], got {tuple(values.shape)}"
            )
        return reduced_from_kept(tokens, top_k(values.float().norm(dim=-1), k), context.grid)


@REDUCERS.register("fastv")
class FastV(InLMReducer):
    """FastV (K = `layer` = 2): layers 0..K-1 run on every token; entering layer K, keep the K image
    tokens the last text token attended to most in layer K-1 (the K-th layer, mean over heads).

    `context.attention` is that attention row over the image tokens; the layers before pruning
    run on full tokens, which `flops.layer_seq_lens` counts (so `overhead_flops` is 0).
    """

    name = "fastv"
    needs = frozenset({"attention"})

    def __init__(self, layer: int = 2) -> None:
        self.layer = int(layer)

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        assert context.attention is not None
        _check_vector(context.attention, tokens.shape[0], "attention")
        return reduced_from_kept(tokens, top_k(context.attention, k), context.grid)


def pdrop_stage_ratio(keep: float, stages: int) -> float:
    """Per-stage ratio λ such that the mean fraction of image tokens over the stages, (Σ_s λ^s)/S for
    s = 0..S-1, equals `keep`: PDrop then costs the same LM compute as pruning once to `keep`."""
    if stages < 1 or not 1 / stages <= keep <= 1:
        raise TokenReductionError(
            f"PDrop with {stages} stages needs keep in [1/{stages}, 1] (its first stage keeps every token; "
            f"at 1/{stages} later stages keep 1 token), got keep={keep}; use fewer stages or a larger keep"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**s for s in range(stages)) / stages < keep else (lo, mid)
    return (lo + hi) / 2


def pdrop_schedule(n: int, n_layers: int, stages: int = 4, ratio: float = 0.5) -> list[tuple[int, int]]:
    """PDrop's pyramid: [(first_layer, image_tokens)] per stage; stage s starts at layer s·L/S
    (rounded down) and keeps round(N·λ^s) tokens (at least 1)."""
    if stages < 1 or n_layers < stages or not 0 < ratio <= 1 or n < 1:
        raise TokenReductionError(
            f"bad PDrop schedule: n={n} (>= 1), n_layers={n_layers}, stages={stages} (1..n_layers), "
            f"ratio={ratio} (in (0, 1])"
        )
    return [(s * n_layers // stages, max(1, math.floor(n * ratio**s + 0.5))) for s in range(stages)]


def prune_stage(attention: Tensor, count: int) -> Tensor:
    """One PDrop stage boundary: ascending positions (within the current image tokens) of the `count`
    tokens the last instruction token attends to most."""
    if not 1 <= count <= attention.numel():
        raise TokenReductionError(f"stage keeps {count} tokens, allowed 1..{attention.numel()}")
    return top_k(attention, count)


@REDUCERS.register("pdrop")
class PDrop(InLMReducer):
    """PyramidDrop: FastV's ranking repeated at stage boundaries with a geometric keep schedule.

    `reduce` performs one stage (prune to K by last-token attention); a model adapter runs the whole
    pyramid with `pdrop_schedule` + `prune_stage`, choosing λ with `pdrop_stage_ratio` when the
    budget is given as an average keep ratio. Its cost is the full tokens in the layers before each
    boundary (`flops.layer_seq_lens`), so `overhead_flops` is 0.
    """

    name = "pdrop"
    needs = frozenset({"attention"})

    def __init__(self, stages: int = 4, ratio: float | None = None) -> None:
        if stages < 1 or (ratio is not None and not 0 < ratio <= 1):
            raise TokenReductionError(f"PDrop needs stages >= 1 and ratio in (0, 1], got {stages}, {ratio}")
        self.stages = int(stages)
        self.ratio = ratio  # None: derived from the keep ratio by pdrop_stage_ratio (same mean budget)

    def schedule(self, n: int, n_layers: int, keep: float) -> list[tuple[int, int]]:
        ratio = self.ratio if self.ratio is not None else pdrop_stage_ratio(keep, self.stages)
        return pdrop_schedule(n, n_layers, self.stages, ratio)

    def _boundaries(self, n: int, n_layers: int, keep: float, min_keep: int) -> list[tuple[int, int]]:
        return [(first, count) for first, count in self.schedule(n, n_layers, keep) if first > 0]

    def prune(self, tokens: Tensor, context: ReductionContext, count: int) -> Tensor:
        """One pyramid boundary: the `count` tokens the last instruction token attends to most."""
        assert context.attention is not None
        return prune_stage(context.attention, count)

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        assert context.attention is not None
        _check_vector(context.attention, tokens.shape[0], "attention")
        return reduced_from_kept(tokens, prune_stage(context.attention, k), context.grid)


def _similarity(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _pool(tokens: Tensor, slot: Tensor, k: int, size: Tensor | None = None) -> Tensor:
    """Per-slot (size-weighted) mean of tokens; slot [N] in 0..k-1."""
    size = torch.ones(tokens.shape[0], device=tokens.device) if size is None else size.float()
    total = torch.zeros(k, tokens.shape[1], device=tokens.device).index_add_(
        0, slot, tokens.float() * size[:, None]
    )
    mass = torch.zeros(k, device=tokens.device).index_add_(0, slot, size)
    return (total / mass[:, None]).to(tokens.dtype)


def _slots_of(kept: Tensor, owner: Tensor) -> Tensor:
    """Map owner token indices (each a member of ascending `kept`) to slots 0..K-1."""
    return torch.searchsorted(kept, owner)


@REDUCERS.register("visionzip")
class VisionZip(TokenReducer):
    """VisionZip: dominant tokens by attention received + a few contextual tokens merged by similarity.

    Of K slots, round(K·contextual) (at least 1 when tokens remain) are contextual. Dominant tokens
    are the top by `context.attention` (mean attention received over queries and heads of the
    vision encoder's last layers). The remaining tokens yield evenly spaced targets; every other
    remaining token joins its most cosine-similar target, and each contextual token is the mean of
    its group. VisionZip's default 54 dominant + 10 contextual of 64 sets contextual=10/64.
    """

    name = "visionzip"
    stage = POST_CONNECTOR
    needs = frozenset({"attention"})

    def __init__(self, contextual: float = 10 / 64) -> None:
        if not 0 <= contextual < 1:
            raise TokenReductionError(f"visionzip contextual fraction must be in [0, 1), got {contextual}")
        self.contextual = float(contextual)

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """Similarity of the remaining tokens to the `n_ctx` contextual targets (default: this reducer's
        `contextual` share of k, at least 1) + their sums."""
        n_ctx = inputs.get("n_ctx", max(1, math.floor(k * self.contextual + 0.5)))
        rest = n - (k - n_ctx)
        return 2 * rest * d + 2 * rest * n_ctx * d + 2 * rest * d

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        assert context.attention is not None
        n = tokens.shape[0]
        _check_vector(context.attention, n, "attention")
        n_ctx = (
            0 if k == n or self.contextual == 0 else min(k - 1, max(1, math.floor(k * self.contextual + 0.5)))
        )
        if n_ctx == 0:
            return reduced_from_kept(tokens, top_k(context.attention, k), context.grid)
        dominant = top_k(context.attention, k - n_ctx)
        rest_mask = torch.ones(n, dtype=torch.bool, device=tokens.device)
        rest_mask[dominant] = False
        rest = rest_mask.nonzero().squeeze(1)
        targets = rest[torch.linspace(0, rest.numel() - 1, n_ctx, device=tokens.device).round().long()]
        kept = torch.sort(torch.cat([dominant, targets])).values
        owner = torch.arange(n, device=tokens.device)
        owner[rest] = targets[_similarity(tokens[rest], tokens[targets]).argmax(dim=1)]
        owner[targets] = targets
        slot = _slots_of(kept, owner)
        return reduced_from_kept(tokens, kept, context.grid, merged=_pool(tokens, slot, k), assignment=slot)


@REDUCERS.register("tome")
class ToMe(TokenReducer):
    """ToMe after the encoder: bipartite soft matching rounds until K tokens remain.

    Each round splits the current tokens (in original order) alternately into A and B, matches every
    A token to its most cosine-similar B token, and merges the r best-matched A tokens into their
    partners by size-weighted mean (r = min(`r`, |A|, excess); `r=None` takes as many as allowed).
    A merged token keeps the index and position of its B token.
    """

    name = "tome"
    stage = POST_CONNECTOR
    needs = frozenset()
    supports_generation = True

    def __init__(self, r: int | None = None) -> None:
        if r is not None and r < 1:
            raise TokenReductionError(f"ToMe merges r >= 1 pairs per round, got r={r}")
        self.r = r

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """The matching rounds (`r` pairs per round; absent or 0: this reducer's `r`)."""
        r = inputs.get("r") or self.r
        total = 0
        while n > k:
            a, b = (n + 1) // 2, n // 2
            merged = min(n - k, a, r or a)
            total += 3 * n * d + 2 * a * b * d + 2 * n * d  # normalise, A·Bᵀ similarity, weighted sums
            n -= merged
        return total

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        n = tokens.shape[0]
        index = torch.arange(n, device=tokens.device)  # original index of each current token
        current = tokens.float()
        size = torch.ones(n, device=tokens.device)
        owner = torch.arange(n, device=tokens.device)  # current position of each original token
        while current.shape[0] > k:
            a = torch.arange(0, current.shape[0], 2, device=tokens.device)
            b = a[: current.shape[0] // 2] + 1
            r = min(current.shape[0] - k, a.numel(), self.r or a.numel())
            best, partner = _similarity(current[a], current[b]).max(dim=1)
            merged_a = torch.sort(best, descending=True, stable=True).indices[:r]
            target = torch.arange(current.shape[0], device=tokens.device)
            target[a[merged_a]] = b[partner[merged_a]]
            survivors = torch.ones(current.shape[0], dtype=torch.bool, device=tokens.device)
            survivors[a[merged_a]] = False
            new_pos = torch.cumsum(survivors, 0) - 1  # position among survivors
            slot = new_pos[target]
            total = torch.zeros(current.shape[0] - r, current.shape[1], device=tokens.device)
            total.index_add_(0, slot, current * size[:, None])
            size = torch.zeros(total.shape[0], device=tokens.device).index_add_(0, slot, size)
            current = total / size[:, None]
            index = index[survivors]
            owner = slot[owner]
        return reduced_from_kept(
            tokens, index, context.grid, merged=current.to(tokens.dtype), assignment=owner
        )


@REDUCERS.register("random")
class RandomDrop(TokenReducer):
    """Keep K tokens uniformly at random (context.generator makes it reproducible)."""

    name = "random"
    stage = POST_CONNECTOR
    needs = frozenset()
    supports_generation = True

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        perm = torch.randperm(tokens.shape[0], generator=context.generator)
        return reduced_from_kept(tokens, torch.sort(perm[:k]).values.to(tokens.device), context.grid)


@REDUCERS.register("grid")
class GridPool(TokenReducer):
    """Uniform spatial subsampling (merge=False) or pooling (merge=True, default) as a sanity baseline.

    Kept tokens are the centres of the smallest hk×wk sub-grid with hk·wk >= K that follows the
    image's aspect ratio, thinned evenly in raster order to exactly K; with merge, every token
    joins the spatially nearest kept token and each kept token is the mean of its region.
    """

    name = "grid"
    stage = POST_CONNECTOR
    needs = frozenset()
    supports_generation = True

    def __init__(self, merge: bool = True) -> None:
        self.merge = bool(merge)

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """2-D distances to the kept cells + region sums."""
        return 6 * n * k + 2 * n * d

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        h, w = context.grid
        hk = min(h, max(1, math.floor(math.sqrt(k * h / w) + 0.5)))
        wk = min(w, math.ceil(k / hk))
        hk = math.ceil(k / wk)  # rounding may leave too few rows: hk·wk >= K, hk <= h
        rows = (torch.arange(hk) * 2 + 1) * h // (2 * hk)
        cols = (torch.arange(wk) * 2 + 1) * w // (2 * wk)
        centres = (rows[:, None] * w + cols[None, :]).reshape(-1)
        pick = torch.linspace(0, centres.numel() - 1, k).round().long()
        kept = torch.sort(centres[pick]).values.to(tokens.device)
        if not self.merge:
            return reduced_from_kept(tokens, kept, context.grid)
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        slot = torch.cdist(yx.float(), yx[kept.cpu()].float()).argmin(dim=1).to(tokens.device)
        return reduced_from_kept(tokens, kept, context.grid, merged=_pool(tokens, slot, k), assignment=slot)
