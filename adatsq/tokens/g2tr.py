"""G2TR: generation-guided token reduction for unified multimodal models.

A UMM encodes the same image twice: a semantic ViT for understanding and a generation encoder (VAE or
VQ) for synthesis. The generation latent is a compact, spatially faithful summary of the image, so it
tells which understanding tokens carry the content of each region. G2TR

1. builds one *anchor* per latent cell: the latent, patchified, average-pooled (pool 2) and projected
   into the LM hidden space by the model's own latent-to-LM projection (BAGEL's ``vae2llm``; without
   one, a parameter-free channel interpolation) — `anchors_from_latent`;
2. scores understanding token i by its cosine similarity with the anchor of the latent cell it falls
   in, cell = (floor(row·h_lat/h_vit), floor(col·w_lat/w_vit)) — `cells`, `scores`;
3. keeps K = clamp(round(N·keep), min_keep, N) tokens, balanced over space: first the best token of
   every latent cell (the K best of those if there are more cells than K), then the globally best
   of the rest — `select`;
4. merges each removed token into the retained token it is most cosine-similar to; the retained token
   becomes the weighted mean of its cluster (weight `weight` on itself, 1 on each member) — `merge`;
5. rebuilds the sequence with retained tokens at their original 2-D positions (`Reduced.positions`).

Ties are broken by the lower token index everywhere, so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from adatsq.errors import TokenReductionError
from adatsq.tokens.base import (
    POST_CONNECTOR,
    REDUCERS,
    Reduced,
    ReductionContext,
    TokenReducer,
    check_grid,
    keep_count,
    reduced_from_kept,
)

__all__ = ["G2TR", "anchors_from_latent", "assign", "cells", "merge", "scores", "select"]


def anchors_from_latent(
    latent: Tensor,
    patch: int,
    pool: int = 2,
    project: Callable[[Tensor], Tensor] | None = None,
    hidden: int | None = None,
) -> tuple[Tensor, tuple[int, int]]:
    """Anchors [M, D] (row-major over the returned latent grid) from one image's latent [C, H, W].

    The latent is cut into patch×patch patches (the generation path's tokens, C·patch² channels),
    average-pooled over pool×pool patches (ceil mode: a ragged border cell averages what it has), then
    mapped to the LM width by `project` (e.g. BAGEL's vae2llm) or, when the model has no such
    projection, by linear interpolation over the channel dimension to `hidden` channels.
    """
    if latent.dim() != 3:
        raise TokenReductionError(f"latent must be [C, H, W] for one image, got shape {tuple(latent.shape)}")
    c, h, w = latent.shape
    if patch < 1 or pool < 1 or h % patch or w % patch:
        raise TokenReductionError(
            f"latent {h}x{w} is not divisible by patch={patch} (pool={pool}); "
            f"pad the image so the latent is a multiple of the patch size"
        )
    hp, wp = h // patch, w // patch
    # [C, hp, p, wp, p] -> [(py, px, c), hp, wp]: BAGEL's patchify channel order ("chpwq->hwpqc")
    patches = latent.reshape(c, hp, patch, wp, patch).permute(2, 4, 0, 1, 3).reshape(c * patch**2, hp, wp)
    pooled = F.avg_pool2d(patches.float().unsqueeze(0), pool, ceil_mode=True).squeeze(0)
    grid = (pooled.shape[1], pooled.shape[2])
    cells_ = pooled.flatten(1).T  # [M, C·p·p]
    if project is not None:
        anchors = project(cells_.to(latent.dtype))
    else:
        if hidden is None:
            raise TokenReductionError(
                "anchors_from_latent needs `hidden` (the LM width) when the model has no latent-to-LM "
                "projection; pass hidden=<LM hidden size> or project=<the model's projection>"
            )
        anchors = F.interpolate(cells_.unsqueeze(1), size=hidden, mode="linear", align_corners=False)
        anchors = anchors.squeeze(1).to(latent.dtype)
    if hidden is not None and anchors.shape[-1] != hidden:
        raise TokenReductionError(
            f"projected anchors have width {anchors.shape[-1]}, expected hidden={hidden}"
        )
    return anchors, grid


def cells(grid: tuple[int, int], latent_grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Flat latent cell (row-major over latent_grid) of each understanding token of `grid`: LongTensor [N]."""
    h, w = grid
    h2, w2 = latent_grid
    rows = torch.arange(h, device=device) * h2 // h
    cols = torch.arange(w, device=device) * w2 // w
    return (rows[:, None] * w2 + cols[None, :]).reshape(-1)


def _check_anchors(
    tokens: Tensor, anchors: Tensor, grid: tuple[int, int], latent_grid: tuple[int, int]
) -> None:
    check_grid(tokens, grid)
    h2, w2 = latent_grid
    if anchors.dim() != 2 or anchors.shape[0] != h2 * w2:
        raise TokenReductionError(
            f"{tuple(anchors.shape)} anchors do not match latent grid {h2}x{w2} (= {h2 * w2} rows); "
            f"pass the latent_grid returned by anchors_from_latent"
        )
    if anchors.shape[1] != tokens.shape[1]:
        raise TokenReductionError(
            f"anchor width {anchors.shape[1]} differs from token width {tokens.shape[1]}; project the "
            f"anchors into the LM hidden space (project=... or hidden={tokens.shape[1]})"
        )


def scores(tokens: Tensor, anchors: Tensor, grid: tuple[int, int], latent_grid: tuple[int, int]) -> Tensor:
    """Cosine similarity [N] of every understanding token with the anchor of its latent cell."""
    _check_anchors(tokens, anchors, grid, latent_grid)
    cell = cells(grid, latent_grid, tokens.device)
    return F.cosine_similarity(tokens.float(), anchors.float()[cell], dim=-1)


def _rank(score: Tensor) -> Tensor:
    """Token indices by descending score, ties to the lower index."""
    return torch.sort(score, descending=True, stable=True).indices


def select(
    tokens: Tensor,
    anchors: Tensor,
    grid: tuple[int, int],
    latent_grid: tuple[int, int],
    keep: float = 0.5,
    min_keep: int = 32,
) -> Tensor:
    """Balanced selection: ascending kept indices (LongTensor [K]); see the module docstring."""
    score = scores(tokens, anchors, grid, latent_grid)
    n = score.numel()
    k = keep_count(n, keep, min_keep)
    order = _rank(score)  # token at each rank
    cell = cells(grid, latent_grid, tokens.device)[order]  # cell at each rank
    n_cells = latent_grid[0] * latent_grid[1]
    ranks = torch.arange(n, device=tokens.device)
    first = torch.full((n_cells,), n, dtype=torch.long, device=tokens.device)
    first = first.scatter_reduce(0, cell, ranks, reduce="amin")  # best rank inside each cell
    rep_ranks = torch.sort(first[first < n]).values  # one per non-empty cell, best first
    chosen = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    chosen[rep_ranks[:k]] = True
    fill = ranks[~chosen][: k - int(chosen.sum())]
    chosen[fill] = True
    return torch.sort(order[chosen]).values


def assign(tokens: Tensor, kept: Tensor) -> Tensor:
    """Slot [N] of the retained token each token joins: itself if kept, else the most cosine-similar kept."""
    kept = kept.long()
    slot = torch.empty(tokens.shape[0], dtype=torch.long, device=tokens.device)
    slot[kept] = torch.arange(kept.numel(), device=tokens.device)
    removed = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    removed[kept] = False
    if bool(removed.any()):
        normed = F.normalize(tokens.float(), dim=-1)
        slot[removed] = (normed[removed] @ normed[kept].T).argmax(dim=1)  # ties -> lower slot
    return slot


def _check_kept(tokens: Tensor, kept: Tensor) -> None:
    n = tokens.shape[0]
    if kept.dim() != 1 or kept.numel() == 0 or kept.numel() > n:
        raise TokenReductionError(f"kept must be a 1-D index of 1..{n} tokens, got shape {tuple(kept.shape)}")
    if bool((kept.diff() <= 0).any()) or int(kept[0]) < 0 or int(kept[-1]) >= n:
        raise TokenReductionError(
            f"kept indices must be strictly ascending in [0, {n}); sort and deduplicate"
        )


def merge(tokens: Tensor, kept: Tensor, weight: float = 1.0, slot: Tensor | None = None) -> Tensor:
    """Merged tokens [K, D]: (weight·t_kept + Σ members) / (weight + #members) for every kept token."""
    _check_kept(tokens, kept)
    if not weight > 0:
        raise TokenReductionError(f"merge weight of the representative must be > 0, got {weight}")
    kept = kept.long()
    slot = assign(tokens, kept) if slot is None else slot
    k = kept.numel()
    members = torch.ones(tokens.shape[0], dtype=torch.float32, device=tokens.device)
    members[kept] = weight
    total = torch.zeros(k, tokens.shape[1], dtype=torch.float32, device=tokens.device)
    total.index_add_(0, slot, tokens.float() * members[:, None])
    mass = torch.zeros(k, dtype=torch.float32, device=tokens.device).index_add_(0, slot, members)
    return (total / mass[:, None]).to(tokens.dtype)


@REDUCERS.register("g2tr")
class G2TR(TokenReducer):
    """Generation-guided selection + similarity merge (set merge=False for the selection-only ablation)."""

    name = "g2tr"
    stage = POST_CONNECTOR
    needs = frozenset({"anchors", "latent_grid"})
    supports_generation = True  # a latent token's anchor is its own latent cell
    overhead_inputs = frozenset({"vae_flops", "m", "latent_dim"})

    def __init__(self, weight: float = 1.0, merge: bool = True) -> None:
        if not weight > 0:
            raise TokenReductionError(f"G2TR merge weight must be > 0, got {weight}")
        self.weight = float(weight)
        self.merge = bool(merge)

    def _reduce(self, tokens: Tensor, context: ReductionContext, k: int) -> Reduced:
        assert context.anchors is not None and context.latent_grid is not None
        kept = select(
            tokens, context.anchors, context.grid, context.latent_grid, context.keep, context.min_keep
        )
        assert kept.numel() == k
        if not self.merge:
            return reduced_from_kept(tokens, kept, context.grid)
        slot = assign(tokens, kept)
        merged = merge(tokens, kept, self.weight, slot=slot)
        return reduced_from_kept(tokens, kept, context.grid, merged=merged, assignment=slot)

    def overhead_flops(self, n: int, d: int, k: int, **inputs: int) -> int:
        """`vae_flops` (generation-encoder pass, required: the caller measures its model) + anchor
        projection (`m` anchors of `latent_dim` channels: 2·m·latent_dim·d; 0 when parameter-free)
        + scores (token/anchor norms and dots) + merge similarity of removed to kept tokens
        2·(n-k)·k·d and cluster sums."""
        if "vae_flops" not in inputs:
            raise TokenReductionError(
                "g2tr overhead needs vae_flops=<FLOPs of the generation encoder on this image> "
                "(pass 0 only if the latent is computed anyway, e.g. for editing)"
            )
        m = inputs.get("m", 0)
        project_flops = 2 * m * inputs.get("latent_dim", 0) * d
        score_flops = 2 * n * d * 3 + 2 * m * d  # token norms, dots, cosine; anchor norms
        merge_flops = 2 * n * d + 2 * (n - k) * k * d + 2 * n * d  # normalise, removed x kept sims, sums
        return int(inputs["vae_flops"]) + project_flops + score_flops + merge_flops
