import pytest
import torch
from torch import nn

from adatsq.calibrate.capture import StatsCapture, accumulate_absmax, accumulate_hessian
from adatsq.errors import CalibrationError


def test_accumulate_hessian_streams_the_same_sum_as_one_batch():
    x = torch.randn(3, 5, 4)
    H, n = torch.zeros(4, 4, dtype=torch.float64), 0
    for chunk in x:
        H, n = accumulate_hessian(H, n, chunk)
    rows = x.reshape(-1, 4).double()
    assert n == 15
    torch.testing.assert_close(H, rows.T @ rows, rtol=1e-6, atol=1e-5)  # per-batch products run in float32


def test_accumulate_absmax_is_per_channel():
    m = accumulate_absmax(torch.zeros(3), torch.tensor([[1.0, -5.0, 0.0], [-2.0, 1.0, 0.5]]))
    assert m.tolist() == [2.0, 5.0, 0.5]


def test_capture_separates_segments_and_weights_them():
    layer = nn.Linear(3, 2)
    capture = StatsCapture({"fc": layer}, segments=2)
    a, b = torch.randn(4, 3), torch.randn(6, 3) * 10
    with capture:
        capture.set_position(0, 0)
        layer(a)
        capture.set_position(1, 5)
        layer(b)
    layer(a)  # hooks removed: not counted
    stats = capture.stats["fc"]
    assert stats.tokens.tolist() == [4, 6]
    torch.testing.assert_close(stats.segment_hessian(1), (b.T @ b).double() / 6)
    only_second = stats.hessian(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(only_second, stats.segment_hessian(1))
    mean = stats.hessian()
    torch.testing.assert_close(mean, (stats.segment_hessian(0) + stats.segment_hessian(1)) / 2)


def test_nonfinite_activations_name_layer_and_step():
    layer = nn.Linear(2, 2)
    capture = StatsCapture({"blocks.3.fc": layer}, segments=1)
    with capture, pytest.raises(CalibrationError, match=r"'blocks.3.fc' at sampler step 7"):
        capture.set_position(0, 7)
        layer(torch.tensor([[1.0, float("nan")]]))


def test_layers_that_never_ran_fail_loudly():
    capture = StatsCapture({"unused": nn.Linear(2, 2)}, segments=1)
    with pytest.raises(CalibrationError, match="never ran"):
        capture.check_filled()
    with pytest.raises(CalibrationError, match="no Linear layer"):
        StatsCapture({}, segments=1)


def test_layers_reading_one_input_share_one_accumulator():
    q, k, other = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(4, 2)
    layers = {"blocks.0.attn.to_q": q, "blocks.0.attn.to_k": k, "blocks.0.ff.proj": other}
    capture = StatsCapture(layers, segments=1)
    assert capture.stats["blocks.0.attn.to_q"] is capture.stats["blocks.0.attn.to_k"]
    assert capture.stats["blocks.0.ff.proj"] is not capture.stats["blocks.0.attn.to_q"]
    x, y = torch.randn(6, 4), torch.randn(2, 4)
    with capture:
        for inputs in (x, y):
            capture.set_position(0, 0)
            q(inputs), k(inputs), other(inputs)
    shared, alone = capture.stats["blocks.0.attn.to_q"], capture.stats["blocks.0.ff.proj"]
    assert shared.tokens.tolist() == alone.tokens.tolist() == [8]  # counted once per call, not per layer
    assert torch.equal(shared.xtx, alone.xtx)  # exactly what one layer alone accumulates


def test_grouped_layers_that_read_different_tensors_are_refused():
    q, k = nn.Linear(4, 3), nn.Linear(4, 3)
    capture = StatsCapture({"blocks.0.attn.to_q": q, "blocks.0.attn.to_k": k}, segments=1)
    with capture, pytest.raises(CalibrationError, match="expected to read one input tensor"):
        capture.set_position(0, 0)
        q(torch.randn(2, 4))
        k(torch.randn(2, 4))
