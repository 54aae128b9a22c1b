"""engine/solve.py: the statistics a variant is solved on, and the variant itself."""

import torch

from adatsq.calibrate.capture import LayerStats
from adatsq.checkpoint.format import LayerSpec
from adatsq.engine.solve import segment_mask, variant_statistics


def stats(seed=0, segments=3, dim=5):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(10 * (s + 1), dim, generator=g, dtype=torch.float64) * (s + 1) for s in range(segments)]
    return LayerStats(
        xtx=torch.stack([x.T @ x for x in xs]),
        tokens=torch.tensor([len(x) for x in xs]),
        absmax=torch.stack([x.abs().amax(dim=0).float() for x in xs]),
    ), xs


def test_segment_mask_marks_the_segments_of_a_bit_width():
    spec = LayerSpec((3, 8, 3, 4), 32, False)
    assert segment_mask(spec, 3).tolist() == [True, False, True, False]
    assert segment_mask(spec, 8).tolist() == [False, True, False, False]


def test_variant_statistics_weights_the_masked_segments_means():
    st, xs = stats()
    mask = torch.tensor([True, False, True])
    weights = torch.tensor([0.2, 0.7, 0.1])
    H, absmax = variant_statistics(st, mask, weights)
    means = [x.T @ x / len(x) for x in xs]
    expected = (0.2 * means[0] + 0.1 * means[2]) / 0.3  # renormalised over the segments in the mask
    torch.testing.assert_close(H, expected)
    torch.testing.assert_close(absmax, torch.maximum(xs[0].abs().amax(0), xs[2].abs().amax(0)).float())


def test_variant_statistics_without_weights_averages_the_segments():
    st, xs = stats(seed=1)
    mask = torch.tensor([False, True, True])
    H, _ = variant_statistics(st, mask, None)
    torch.testing.assert_close(H, (xs[1].T @ xs[1] / len(xs[1]) + xs[2].T @ xs[2] / len(xs[2])) / 2)
    # segments whose Fisher weights are all zero fall back to the plain average instead of dividing by 0
    zero, _ = variant_statistics(st, mask, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(zero, H)


def test_variant_statistics_is_not_the_token_weighted_pool():
    # per-segment MEANS are weighted: a segment with many tokens does not dominate (the pool would)
    st, xs = stats(seed=2, segments=2)
    H, _ = variant_statistics(st, torch.tensor([True, True]), None)
    pooled = (xs[0].T @ xs[0] + xs[1].T @ xs[1]) / (len(xs[0]) + len(xs[1]))
    assert float((H - pooled).abs().max()) > 0.1 * float(pooled.abs().max())
