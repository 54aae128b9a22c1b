import itertools

import pytest
import torch

from adatsq.errors import CalibrationError, ConfigError
from adatsq.quant.gptq import gptq
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import WEIGHT_BITS, WeightScheme, compute_qparams, quant_error


def _layer(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven channel scales: a realistic, positive-definite H
    X = torch.randn(4 * cols, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.3)
    X = X + torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, (X.T @ X).double()


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "act_order"),
    list(itertools.product(WEIGHT_BITS, [None, 32], [True, False], [False, True])),
)
def test_gptq_beats_rtn(bits, group_size, symmetric, act_order):
    W, H = _layer()
    scheme = WeightScheme(bits, group_size, symmetric)
    result = gptq(W, H, scheme, act_order=act_order)
    rtn_loss = quant_error(W, rtn(W, scheme).dequantize(), H)
    assert result.loss == pytest.approx(quant_error(W, result.weight.dequantize(), H), rel=1e-9)
    assert result.loss < 0.8 * rtn_loss, (result.loss, rtn_loss)
    assert result.damp == 0.01 and result.damp_escalations == 0 and result.dead_columns == 0
    qw = result.weight
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2**bits
    assert torch.equal(qw.group_index(), torch.arange(128) // (group_size or 128))  # static groups


def test_act_order_keeps_static_contiguous_groups():
    W, H = _layer(16, 96)
    scheme = WeightScheme(4, 32)
    result = gptq(W, H, scheme, act_order=True)
    assert torch.equal(result.weight.group_index(), torch.arange(96) // 32)
    for g in range(3):  # each grid is the min-max grid of the original columns of its group
        scale, zero = compute_qparams(W[:, 32 * g : 32 * (g + 1)], scheme)
        torch.testing.assert_close(result.weight.scales[:, g], scale)
        torch.testing.assert_close(result.weight.zeros[:, g].float(), zero)


def test_partial_last_group_and_uneven_block():
    W, H = _layer(8, 100)
    for gs in (32, 48, 256):
        result = gptq(W, H, WeightScheme(4, gs), block_size=40)
        assert result.weight.scales.shape == (8, -(-100 // gs))
        assert result.loss < quant_error(W, rtn(W, WeightScheme(4, gs)).dequantize(), H)


def test_deterministic():
    W, H = _layer()
    a = gptq(W, H, WeightScheme(3, 32, False), act_order=True)
    b = gptq(W, H, WeightScheme(3, 32, False), act_order=True)
    assert torch.equal(a.weight.codes, b.weight.codes)
    assert torch.equal(a.weight.scales, b.weight.scales)
    assert a.loss == b.loss


def test_dead_columns():
    W, H = _layer(16, 64)
    dead = [3, 40]
    H[dead, :] = 0
    H[:, dead] = 0
    W[:, dead] = 5.0  # large values in unused columns must not spoil the grid of their group
    result = gptq(W, H, WeightScheme(4, 32))
    assert result.dead_columns == 2
    deq = result.weight.dequantize()
    assert bool((deq[:, dead] == 0).all())
    assert torch.isfinite(torch.tensor(result.loss))
    Wz = W.clone()
    Wz[:, dead] = 0
    assert result.loss < quant_error(Wz, rtn(Wz, WeightScheme(4, 32)).dequantize(), H)


def test_damping_escalation_is_recorded():
    W, H = _layer(16, 64)
    shift = float(torch.linalg.eigvalsh(H).min()) + 0.05 * float(torch.diag(H).mean())
    H = H - shift * torch.eye(64, dtype=torch.float64)  # indefinite: 1% damping is not enough, 10% is
    assert float(torch.linalg.eigvalsh(H).min()) < 0
    result = gptq(W, H, WeightScheme(4, 32))
    assert result.damp_escalations == 1
    assert result.damp == pytest.approx(0.1)
    assert torch.isfinite(result.weight.dequantize()).all()


def test_damping_gives_up_with_calibration_error():
    W = torch.randn(4, 8)
    H = -torch.eye(8, dtype=torch.float64) * 10  # negative definite: no damping <= 1 helps
    H[0, 0] = 100
    with pytest.raises(CalibrationError, match="max_damp"):
        gptq(W, H, WeightScheme(4, None))


def test_bad_inputs():
    W = torch.randn(4, 8)
    with pytest.raises(ConfigError):
        gptq(W, torch.eye(7), WeightScheme())
    with pytest.raises(ConfigError):
        gptq(W, torch.eye(8), WeightScheme(), damp=0)
    H = torch.eye(8)
    H[1, 1] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        gptq(W, H, WeightScheme())
