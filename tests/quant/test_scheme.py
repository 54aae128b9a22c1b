import itertools

import pytest
import torch

from adatsq.errors import AdatsqError, ConfigError
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import (
    ACT_BITS,
    WEIGHT_BITS,
    ActScheme,
    QuantizedWeight,
    WeightScheme,
    activation_codes,
    fake_quant_activation,
    quant_error,
)


@pytest.mark.parametrize("bits", [1, 5, 7, 16, True, "4"])
def test_weight_bits_rejected_with_allowed_values(bits):
    with pytest.raises(ConfigError, match=r"\(2, 3, 4, 6, 8\)"):
        WeightScheme(bits=bits)


@pytest.mark.parametrize("group_size", [0, -32, 12.5, True, "128"])
def test_group_size_rejected(group_size):
    with pytest.raises(ConfigError, match="group_size"):
        WeightScheme(group_size=group_size)


@pytest.mark.parametrize("bits", [2, 6, 16, True])
def test_act_bits_rejected(bits):
    with pytest.raises(ConfigError, match=r"\(4, 8\)"):
        ActScheme(bits=bits)


def test_valid_schemes_and_error_family():
    for bits in WEIGHT_BITS:
        for gs in (None, 32, 64, 128, 100):
            WeightScheme(bits=bits, group_size=gs, symmetric=False)
    for bits in (None, *ACT_BITS):
        ActScheme(bits=bits)
    assert issubclass(ConfigError, AdatsqError)
    with pytest.raises(ConfigError):
        WeightScheme(symmetric=1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32, 48])
def test_rtn_error_decreases_with_bits(symmetric, group_size):
    torch.manual_seed(0)
    W = torch.randn(32, 100)  # 100 is not a multiple of 32 / 48: a partial last group
    H = torch.eye(100, dtype=torch.float64)
    errors = [
        quant_error(W, rtn(W, WeightScheme(b, group_size, symmetric)).dequantize(), H) for b in WEIGHT_BITS
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3 * errors[0]


def test_rtn_grid_properties():
    torch.manual_seed(1)
    W = torch.randn(8, 70)
    for scheme in (WeightScheme(4, 32, True), WeightScheme(3, 32, False), WeightScheme(8, None, False)):
        qw = rtn(W, scheme)
        assert qw.codes.dtype == torch.uint8 and qw.zeros.dtype == torch.uint8
        assert int(qw.codes.max()) < 2**scheme.bits
        assert qw.scales.shape == qw.zeros.shape == (8, 1 if scheme.group_size is None else 3)
        # float16-exact scales: storing them in half precision changes nothing
        assert torch.equal(qw.scales, qw.scales.half().float())
        if scheme.symmetric:
            assert bool((qw.zeros == 2 ** (scheme.bits - 1)).all())
        # zero is exactly representable, and the error is at most half a step inside the range
        step = qw.scales[:, qw.group_index()]
        assert bool(((qw.dequantize() - W).abs() <= step * 0.5 + 1e-6).float().mean() > 0.97)
        assert torch.equal(qw.group_index(), torch.arange(70) // (scheme.group_size or 70))


def test_rtn_zero_rows_and_columns_stay_zero():
    W = torch.randn(4, 64)
    W[1] = 0
    W[:, 5] = 0
    for sym in (True, False):
        deq = rtn(W, WeightScheme(4, 32, sym)).dequantize()
        assert bool((deq[1] == 0).all()) and bool((deq[:, 5] == 0).all())


def test_quantized_weight_validates_shapes():
    with pytest.raises(ConfigError):
        QuantizedWeight(
            codes=torch.zeros(4, 64, dtype=torch.uint8),
            scales=torch.ones(4, 3),
            zeros=torch.zeros(4, 3, dtype=torch.uint8),
            bits=4,
            group_size=32,
        )


def test_quant_error_matches_trace():
    torch.manual_seed(2)
    W, Wq = torch.randn(5, 7), torch.randn(5, 7)
    X = torch.randn(20, 7)
    H = X.T @ X
    D = W.double() - Wq.double()
    expected = torch.trace(D @ H.double() @ D.T)
    assert quant_error(W, Wq, H) == pytest.approx(float(expected), rel=1e-12)


def test_fake_quant_activation():
    torch.manual_seed(3)
    x = torch.randn(4, 10, 256)
    assert fake_quant_activation(x, ActScheme(None)) is x
    y8 = fake_quant_activation(x, ActScheme(8))
    y4 = fake_quant_activation(x, ActScheme(4))
    rel8 = float((y8 - x).norm() / x.norm())
    rel4 = float((y4 - x).norm() / x.norm())
    assert rel8 < 0.01 and rel8 < rel4 / 10, (rel8, rel4)
    # per token: each token uses at most 2*qmax+1 levels of its own scale, and keeps its absmax
    assert bool(torch.allclose(y8.abs().amax(-1), x.abs().amax(-1)))
    assert fake_quant_activation(x.bfloat16(), ActScheme(8)).dtype == torch.bfloat16
    assert bool((fake_quant_activation(torch.zeros(3, 8), ActScheme(4)) == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_codes_need_no_clamp(dtype, bits):
    """The codes equal the clamped |x|.amax() form they replaced, on rows built to sit on the edges."""
    g = torch.Generator().manual_seed(bits)
    qmax = 2 ** (bits - 1) - 1
    rows = [
        torch.randn(4000, 96, generator=g) * torch.logspace(-14, 4, 4000)[:, None],  # tiny ... huge rows
        torch.randint(-qmax, qmax + 1, (500, 96), generator=g) * torch.rand(500, 1, generator=g),  # on grid
        torch.full((3, 96), 3.0) * torch.tensor([[1.0], [-1.0], [1e-13]]),  # constant rows, all at amax
        torch.zeros(2, 96),
    ]
    x = torch.cat(rows).to(dtype)
    xf = x if dtype != torch.float64 else x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12).div_(qmax)
    clamped = torch.div(xf, scale).round_().clamp_(-qmax, qmax)
    before = x.clone()
    codes, got_scale = activation_codes(x, bits)
    assert torch.equal(got_scale, scale) and torch.equal(codes, clamped)
    assert int(codes.abs().max()) == qmax
    assert torch.equal(x, before) and codes.data_ptr() != x.data_ptr()  # the input is never divided in place


@pytest.mark.parametrize("magnitude", [1e-5, 1e-3, 1.0, 300.0])
def test_rtn_relative_error_independent_of_weight_scale(magnitude):
    """float16 scales are rounded up and may be subnormal: tiny and large layers quantize alike."""
    torch.manual_seed(4)
    W = torch.randn(16, 64) * magnitude
    for symmetric in (True, False):
        qw = rtn(W, WeightScheme(8, 32, symmetric))
        assert torch.isfinite(qw.scales).all() and bool((qw.scales > 0).all())
        assert float((qw.dequantize() - W).norm() / W.norm()) < 0.01
