"""Every reducer returns a consistent `Reduced`; each baseline follows its published rule."""

import pytest
import torch

from adatsq.errors import TokenReductionError
from adatsq.tokens import g2tr
from adatsq.tokens.base import REDUCERS, ReductionContext, get_reducer, keep_count
from adatsq.tokens.baselines import pdrop_schedule, pdrop_stage_ratio, prune_stage

H, W, D = 6, 7, 8


def _context(keep, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    anchors, latent_grid = g2tr.anchors_from_latent(torch.randn(4, 6, 8, generator=g), patch=1, hidden=D)
    return ReductionContext(
        grid=(H, W),
        keep=keep,
        anchors=anchors,
        latent_grid=latent_grid,
        attention=torch.rand(H * W, generator=g),
        values=torch.randn(H * W, 5, generator=g),
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def _tokens(seed=1):
    return torch.randn(H * W, D, generator=torch.Generator().manual_seed(seed))


def _check_consistent(out, n, k):
    assert out.tokens.shape == (k, D)
    assert out.kept_index.dtype == torch.long and torch.all(out.kept_index.diff() > 0)
    assert torch.equal(out.positions[:, 0] * W + out.positions[:, 1], out.kept_index)
    assert out.assignment.shape == (n,) and int(out.assignment.min()) >= -1 and int(out.assignment.max()) < k
    assert torch.equal(out.assignment[out.kept_index], torch.arange(k))  # each kept token owns its slot


@pytest.mark.parametrize("name", ["fastv", "g2tr", "grid", "pdrop", "random", "tome", "visionzip", "vnorm"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.77, 1.0])
def test_every_reducer_is_consistent(name, keep):
    tokens, ctx = _tokens(), _context(keep)
    k = keep_count(H * W, keep)
    out = get_reducer(name).reduce(tokens, ctx)
    _check_consistent(out, H * W, k)
    if keep == 1.0:
        assert torch.allclose(out.tokens, tokens)


def test_all_registered_reducers_are_covered():
    get_reducer("random")
    assert set(REDUCERS.names()) == {"fastv", "g2tr", "grid", "pdrop", "random", "tome", "visionzip", "vnorm"}


@pytest.mark.parametrize("name", ["tome", "visionzip", "grid", "g2tr"])
def test_merged_token_is_mean_of_its_members(name):
    tokens, ctx = _tokens(), _context(0.3)
    out = get_reducer(name, **({"weight": 1.0} if name == "g2tr" else {})).reduce(tokens, ctx)
    assert int(out.assignment.min()) == 0  # merging keeps every token's content
    for j in range(out.k):
        assert torch.allclose(out.tokens[j], tokens[out.assignment == j].mean(0), atol=1e-5)


def test_attention_and_value_pruners_keep_top_scores():
    tokens, ctx = _tokens(), _context(0.25)
    k = keep_count(H * W, 0.25)  # 10.5 rounds half up to 11
    for name in ("fastv", "pdrop"):
        out = get_reducer(name).reduce(tokens, ctx)
        assert set(out.kept_index.tolist()) == set(torch.topk(ctx.attention, k).indices.tolist())
        assert torch.equal(out.tokens, tokens[out.kept_index])
    out = get_reducer("vnorm").reduce(tokens, ctx)
    assert set(out.kept_index.tolist()) == set(torch.topk(ctx.values.norm(dim=1), k).indices.tolist())


def test_visionzip_dominant_tokens_are_top_attention():
    tokens, ctx = _tokens(), _context(0.5)  # K = 21: round(21 * 0.25) = 5 contextual, 16 dominant
    out = get_reducer("visionzip", contextual=0.25).reduce(tokens, ctx)
    dominant = torch.topk(ctx.attention, 16).indices
    slots = out.assignment[dominant]
    assert torch.equal(out.kept_index[slots], dominant)
    assert torch.bincount(out.assignment, minlength=21)[slots].tolist() == [1] * 16  # kept as they are
    contextual = sorted(set(range(21)) - set(slots.tolist()))
    assert len(contextual) == 5 and int(torch.isin(out.assignment, torch.tensor(contextual)).sum()) == 42 - 16


def test_tome_round_size_does_not_change_count():
    tokens, ctx = _tokens(), _context(0.3)
    for r in (1, 3, None):
        out = get_reducer("tome", r=r).reduce(tokens, ctx)
        _check_consistent(out, H * W, 13)


def test_random_is_reproducible_and_grid_is_spread():
    tokens = _tokens()
    a = get_reducer("random").reduce(tokens, _context(0.5, seed=3))
    b = get_reducer("random").reduce(tokens, _context(0.5, seed=3))
    assert torch.equal(a.kept_index, b.kept_index)
    sub = get_reducer("grid", merge=False).reduce(
        torch.randn(64, D), ReductionContext(grid=(8, 8), keep=0.25)
    )
    assert sub.positions.tolist() == [[r, c] for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert int((sub.assignment < 0).sum()) == 48


def test_pdrop_schedule_and_budget_ratio():
    assert pdrop_schedule(576, 32, stages=4, ratio=0.5) == [(0, 576), (8, 288), (16, 144), (24, 72)]
    lam = pdrop_stage_ratio(0.5, 4)
    assert abs(sum(lam**s for s in range(4)) / 4 - 0.5) < 1e-9
    attention = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    assert prune_stage(attention, 2).tolist() == [1, 3]
    with pytest.raises(TokenReductionError, match="stage keeps 6 tokens"):
        prune_stage(attention, 6)
    with pytest.raises(TokenReductionError, match="bad PDrop schedule"):
        pdrop_schedule(10, 2, stages=4)


def test_attention_of_wrong_length_is_rejected():
    ctx = _context(0.5)
    ctx.attention = torch.rand(5)
    with pytest.raises(TokenReductionError, match=r"context.attention must be \[N=42\]"):
        get_reducer("fastv").reduce(_tokens(), ctx)
