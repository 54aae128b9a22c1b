"""Integer group scales (QServe's progressive grid): the grid RTN / GPTQ solve on, and the int8 kernels
that run group-wise weights on it against the reference path."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from adatsq.errors import CheckpointError, ConfigError
from adatsq.quant.gptq import gptq
from adatsq.quant.kernels import KernelPolicy, choose_kernel, layouts
from adatsq.quant.linear import QuantLinear
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import (
    INT8_MAX,
    ActScheme,
    WeightScheme,
    activation_codes,
    group_scale_limit,
    quant_error,
)

LOW_BITS = (2, 3, 4, 6)


def _weight(rows=37, cols=100, seed=0):
    """Rows whose groups differ in magnitude by up to 30x (where group scales matter), one zero row."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g).mul(30).add(1)
    W[3] = 0.0
    return W


def _s2(q):
    return q.scales.double() / q.channel_scales.double()[:, None]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"group_size": None}, "needs a group_size"),
        ({"bits": 8}, "needs bits <= 6"),
        ({"integer_group_scales": 1}, "True or False"),
    ],
)
def test_schemes_the_integer_grid_cannot_hold_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        WeightScheme(**{"bits": 4, "group_size": 64, "integer_group_scales": True, **fields})


@pytest.mark.parametrize(("bits", "symmetric"), itertools.product(LOW_BITS, (True, False)))
def test_group_scale_limit_is_the_largest_that_fits_int8(bits, symmetric):
    limit = group_scale_limit(bits, symmetric)
    reach = 2 ** (bits - 1) if symmetric else 2**bits - 1  # the largest |q - zero| of the grid
    assert 1 <= limit <= 15 and limit * reach <= INT8_MAX
    assert limit == 15 or (limit + 1) * reach > INT8_MAX


@pytest.mark.parametrize(("bits", "symmetric"), itertools.product(LOW_BITS, (True, False)))
@pytest.mark.parametrize("group_size", [32, 48])  # 48: a partial last group of 100 columns
def test_rtn_grid_is_integer_multiples_exact_in_float16_and_covers_every_group(bits, symmetric, group_size):
    W = _weight()
    q = rtn(W, WeightScheme(bits, group_size, symmetric, integer_group_scales=True))
    s2 = _s2(q)
    assert torch.equal(s2, s2.round()) and s2.min() >= 1 and s2.max() <= group_scale_limit(bits, symmetric)
    assert torch.equal(q.scales.half().double(), q.scales.double())  # s1 * s2 is the stored fp16 scale
    assert torch.equal(q.channel_scales.half().float(), q.channel_scales)
    idx = q.group_index()
    w8 = (q.codes.double() - q.zeros.double()[:, idx]) * s2[:, idx]
    assert w8.abs().max() <= INT8_MAX
    assert torch.equal(w8 * q.channel_scales.double()[:, None], q.dequantize().double())
    # RTN never clips: every weight is within half a step of its grid point
    step = q.scales.double()[:, idx]
    assert bool(((q.dequantize().double() - W.double()).abs() <= step / 2 * (1 + 1e-6)).all())
    assert bool((q.dequantize()[3] == 0).all())  # a zero row stays zero


def test_integer_scales_cost_little_against_float_group_scales_and_beat_per_channel():
    W = _weight(rows=64, cols=256)
    H = torch.eye(256, dtype=torch.float64)
    for symmetric in (True, False):
        err = {
            name: quant_error(W, rtn(W, scheme).dequantize(), H)
            for name, scheme in {
                "float": WeightScheme(4, 32, symmetric),
                "integer": WeightScheme(4, 32, symmetric, integer_group_scales=True),
                "channel": WeightScheme(4, None, symmetric),
            }.items()
        }
        assert err["float"] <= err["integer"] < 1.5 * err["float"], err
        assert err["integer"] < 0.75 * err["channel"], err


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_on_the_integer_grid(act_order, symmetric):
    g = torch.Generator().manual_seed(1)
    W = _weight(rows=48, cols=128)
    X = torch.randn(1024, 128, generator=g) * torch.rand(128, generator=g).mul(3)
    H = (X.T @ X).double()
    scheme = WeightScheme(4, 32, symmetric, integer_group_scales=True)
    result = gptq(W, H, scheme, act_order=act_order)
    q = result.weight
    s2 = _s2(q)
    assert torch.equal(s2, s2.round()) and s2.min() >= 1 and s2.max() <= group_scale_limit(4, symmetric)
    assert result.loss == pytest.approx(quant_error(W, q.dequantize(), H), rel=1e-6)
    assert result.loss < quant_error(W, rtn(W, scheme).dequantize(), H)  # GPTQ still pays on this grid
    plain = gptq(W, H, WeightScheme(4, 32, symmetric), act_order=act_order).loss
    channel = gptq(W, H, WeightScheme(4, None, symmetric), act_order=act_order).loss
    assert plain <= 1.5 * result.loss and result.loss < 1.5 * plain and result.loss < channel
    QuantLinear.from_quantized(q, None, ActScheme(8))  # the layer's own check of the grid passes


def _layer(bits, group_size, symmetric, cols, seed=0):
    W = _weight(rows=37, cols=cols, seed=seed)
    qw = rtn(W, WeightScheme(bits, group_size, symmetric, integer_group_scales=True))
    return QuantLinear.from_quantized(qw, torch.randn(37), ActScheme(8))


POLICIES = [
    KernelPolicy(),
    KernelPolicy(cache_int8_low_bits=True),
    KernelPolicy(cache_int8_low_bits=True, onednn=False),
]
SHAPES = [
    (4, 32, 128, 2),
    (2, 32, 128, 4),
    (4, 32, 100, 1),
    (4, 30, 120, 2),
    (4, 33, 99, 1),
    (3, 32, 96, 1),
    (6, 16, 64, 1),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("bits", "group_size", "cols", "planar"), SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_kernels_are_the_reference_function(policy, bits, group_size, cols, planar, symmetric):
    """Exact in float64 on the same integer codes; fp32 / bf16 within the kernels' usual tolerances."""
    layer = _layer(bits, group_size, symmetric, cols)
    layer.kernel_policy = policy
    x = torch.randn(40, cols)
    codes, sx = activation_codes(x, 8)
    exact = F.linear(
        codes.double() * sx.double(), layer.dequantized_weight(torch.float64), layer.bias.double()
    )
    y = layer(x)
    assert layer.kernel.startswith("int8") and layer._kernel_state.group_scale is not None
    if not policy.cache_int8_low_bits:
        assert layer.kernel == "int8-unpack-per-call" and layer._kernel_state.planar == planar
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-6
    xb = x.bfloat16()
    ref = layer.reference_forward(xb).float()
    assert float((layer(xb).float() - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.parametrize(("bits", "group_size", "cols", "planar"), SHAPES)
def test_int8_weight_times_channel_scale_is_the_dequantized_weight(bits, group_size, cols, planar):
    layer = _layer(bits, group_size, False, cols)
    group_scale = layouts.integer_group_scale(layer)
    natural = layouts.int8_weight(layer, group_scale)
    assert layouts.codes_per_byte(bits, cols, group_size) == planar
    expected = layer.dequantized_weight(torch.float64)
    assert torch.equal(natural.double() * layer.channel_scales.double()[:, None], expected)
    if planar > 1:
        order = torch.arange(cols).view(cols // planar, planar).T.reshape(-1)
        assert torch.equal(layouts.planar_int8_weight(layer, group_scale), natural[:, order])


def test_dispatch_runs_integer_group_scales_on_the_int8_paths():
    bf16 = torch.bfloat16
    assert choose_kernel(4, 64, 256, 8, "cpu", bf16, integer_groups=True) == "int8-unpack-per-call"
    assert choose_kernel(4, 64, 256, 8, "cpu", bf16) == "dequant-cached+fake-a8"  # float group scales
    cached = KernelPolicy(cache_int8_low_bits=True)
    assert choose_kernel(4, 64, 256, 8, "cpu", bf16, cached, True, integer_groups=True) == "int8-onednn"
    assert choose_kernel(4, 64, 256, 4, "cpu", bf16, integer_groups=True) == "dequant-cached+fake-a4"
    assert choose_kernel(4, 64, 256, None, "cpu", bf16, integer_groups=True) == "dequant-cached"


def test_a_layer_refuses_scales_off_the_integer_grid():
    layer = _layer(4, 32, False, 128)
    args = (layer.qweight, layer.scales, layer.zeros, None, 4, 32, 128, ActScheme(8))
    QuantLinear(*args, channel_scales=layer.channel_scales)  # the layer's own tensors pass
    with pytest.raises(CheckpointError, match="integer multiples"):
        QuantLinear(*args, channel_scales=layer.channel_scales * 0.75)  # s2 no longer whole numbers
    zeros = torch.zeros_like(layer.zeros)  # |q - z| up to 15: s2 = 15 would overflow int8
    with pytest.raises(CheckpointError, match="integer multiples"):
        QuantLinear(layer.qweight, layer.channel_scales[:, None].expand_as(layer.scales) * 15, zeros,
                    None, 4, 32, 128, ActScheme(8), channel_scales=layer.channel_scales)  # fmt: skip


def test_casting_keeps_both_levels_of_the_grid_in_float16():
    layer = _layer(4, 32, True, 128)
    scales, channel = layer.scales.clone(), layer.channel_scales.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.scales, scales) and torch.equal(layer.channel_scales, channel)
    assert layer.channel_scales.dtype == torch.float16
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    ref = layer.reference_forward(x).float()
    assert float((layer(x).float() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_integer_groups_under_cuda_padding_rules_match_the_reference(monkeypatch):
    """CUDA's `_int_mm` needs M > 16 and K, N multiples of 8: padded inputs, fresh accumulators."""
    from adatsq.quant.kernels import int_mm_rules

    monkeypatch.setattr(layouts, "int_mm_rules", lambda device_type: int_mm_rules("cuda"))
    for policy in POLICIES:
        layer = _layer(4, 32, False, 100)  # K = 100, N = 37: both padded
        layer.kernel_policy = policy
        for m in (1, 16, 33):
            x = torch.randn(m, 100)
            ref = layer.reference_forward(x)
            assert float((layer(x) - ref).abs().max() / ref.abs().max()) < 1e-5
        assert layer._kernel_state.rules.min_rows == 17 and layer.kernel.startswith("int8")
