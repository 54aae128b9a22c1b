"""G2TR: anchors, cell map, balanced selection, merge by hand, the reducer end to end."""

import pytest
import torch
import torch.nn.functional as F

from adatsq.errors import TokenReductionError
from adatsq.tokens import g2tr
from adatsq.tokens.base import ReductionContext, get_reducer


def _case(h=6, w=8, h2=3, w2=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h * w, d, generator=g), torch.randn(h2 * w2, d, generator=g)


def test_cells_follow_floor_rule():
    cell = g2tr.cells((4, 6), (2, 3)).reshape(4, 6)
    for r in range(4):
        for c in range(6):
            assert cell[r, c] == (r * 2 // 4) * 3 + c * 3 // 6
    # latent grid finer than the ViT grid: some cells hold no token
    assert g2tr.cells((2, 2), (4, 4)).tolist() == [0, 2, 8, 10]


def test_scores_are_cosine_with_own_cell_anchor():
    tokens, anchors = _case()
    s = g2tr.scores(tokens, anchors, (6, 8), (3, 4))
    i = 8 * 5 + 7  # row 5, col 7 -> cell (2, 3)
    assert torch.isclose(s[i], F.cosine_similarity(tokens[i], anchors[2 * 4 + 3], dim=0))


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, 1.0])
def test_select_ascending_count_and_every_cell(keep):
    tokens, anchors = _case()
    kept = g2tr.select(tokens, anchors, (6, 8), (3, 4), keep=keep, min_keep=4)
    assert kept.numel() == round(48 * keep)
    assert torch.all(kept.diff() > 0)
    cell = g2tr.cells((6, 8), (3, 4))
    assert set(cell[kept].tolist()) == set(range(12))  # K >= 12 cells: every cell represented
    s = g2tr.scores(tokens, anchors, (6, 8), (3, 4))
    for c in range(12):  # the representative is the cell's best token
        members = (cell == c).nonzero().squeeze(1)
        assert members[s[members].argmax()] in kept


def test_select_fills_by_global_score():
    tokens, anchors = _case()
    kept = g2tr.select(tokens, anchors, (6, 8), (3, 4), keep=0.5, min_keep=1)
    s = g2tr.scores(tokens, anchors, (6, 8), (3, 4))
    cell = g2tr.cells((6, 8), (3, 4))
    reps = {int((cell == c).nonzero().squeeze(1)[s[cell == c].argmax()]) for c in range(12)}
    fill = sorted(set(kept.tolist()) - reps)
    rest = sorted(set(range(48)) - reps, key=lambda i: -s[i])
    assert sorted(rest[: len(fill)]) == fill


def test_select_more_cells_than_k_takes_best_representatives():
    tokens, anchors = _case()
    kept = g2tr.select(tokens, anchors, (6, 8), (3, 4), keep=5 / 48, min_keep=1)
    s = g2tr.scores(tokens, anchors, (6, 8), (3, 4))
    cell = g2tr.cells((6, 8), (3, 4))
    best = torch.stack([s[cell == c].max() for c in range(12)])
    assert kept.numel() == 5 and len(set(cell[kept].tolist())) == 5
    assert torch.allclose(torch.sort(s[kept]).values, torch.sort(best).values[-5:])


def test_merge_equals_cluster_means_by_hand():
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 1.0], [1.0, 0.2]])
    kept = torch.tensor([0, 1])
    merged = g2tr.merge(tokens, kept)
    assert torch.allclose(merged[0], (tokens[0] + tokens[2] + tokens[4]) / 3)
    assert torch.allclose(merged[1], (tokens[1] + tokens[3]) / 2)
    heavy = g2tr.merge(tokens, kept, weight=3.0)
    assert torch.allclose(heavy[0], (3 * tokens[0] + tokens[2] + tokens[4]) / 5)
    assert torch.allclose(heavy[1], (3 * tokens[1] + tokens[3]) / 4)
    assert g2tr.assign(tokens, kept).tolist() == [0, 1, 0, 1, 0]


def test_merge_rejects_bad_kept_and_weight():
    tokens = torch.randn(5, 3)
    with pytest.raises(TokenReductionError, match="strictly ascending"):
        g2tr.merge(tokens, torch.tensor([2, 1]))
    with pytest.raises(TokenReductionError, match="must be > 0"):
        g2tr.merge(tokens, torch.tensor([1, 2]), weight=0.0)


def test_anchor_count_must_match_latent_grid():
    tokens, anchors = _case()
    with pytest.raises(TokenReductionError, match="do not match latent grid 4x4"):
        g2tr.select(tokens, anchors, (6, 8), (4, 4))
    with pytest.raises(TokenReductionError, match="do not fill grid"):
        g2tr.select(tokens, anchors, (6, 7), (3, 4))


def test_anchors_from_latent_patchify_pool_project():
    latent = torch.randn(4, 8, 12)
    proj = torch.nn.Linear(16, 32)
    anchors, grid = g2tr.anchors_from_latent(latent, patch=2, pool=2, project=proj, hidden=32)
    assert grid == (2, 3) and anchors.shape == (6, 32)
    # BAGEL patchify: einsum("chpwq->hwpqc"), then the mean of a 2x2 block of patches
    patches = torch.einsum("chpwq->hwpqc", latent.reshape(4, 4, 2, 6, 2)).reshape(4, 6, 16)
    cell = patches[2:4, 4:6].reshape(4, 16).mean(0)  # latent cell (1, 2)
    assert torch.allclose(anchors[1 * 3 + 2], proj(cell), atol=1e-5)


def test_anchors_parameter_free_interpolation_and_ragged_pool():
    latent = torch.randn(2, 6, 6)  # patch 2 -> 3x3 patches -> pool 2 (ceil) -> 2x2
    anchors, grid = g2tr.anchors_from_latent(latent, patch=2, hidden=24)
    assert grid == (2, 2) and anchors.shape == (4, 24)
    constant, _ = g2tr.anchors_from_latent(torch.full((2, 4, 4), 3.0), patch=2, hidden=24)
    assert torch.allclose(constant, torch.full((4, 24), 3.0))
    with pytest.raises(TokenReductionError, match="needs `hidden`"):
        g2tr.anchors_from_latent(latent, patch=2)
    with pytest.raises(TokenReductionError, match="not divisible by patch=4"):
        g2tr.anchors_from_latent(latent, patch=4)


def test_reducer_matches_plain_functions():
    tokens, anchors = _case()
    ctx = ReductionContext(grid=(6, 8), keep=0.5, min_keep=4, anchors=anchors, latent_grid=(3, 4))
    out = get_reducer("g2tr", weight=2.0).reduce(tokens, ctx)
    kept = g2tr.select(tokens, anchors, (6, 8), (3, 4), 0.5, 4)
    assert torch.equal(out.kept_index, kept)
    assert torch.allclose(out.tokens, g2tr.merge(tokens, kept, 2.0))
    assert out.positions.tolist() == [[int(i) // 8, int(i) % 8] for i in kept]
    pruned = get_reducer("g2tr", merge=False).reduce(tokens, ctx)
    assert torch.equal(pruned.tokens, tokens[kept]) and int((pruned.assignment < 0).sum()) == 24
