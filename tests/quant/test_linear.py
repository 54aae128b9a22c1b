import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adatsq.errors import CheckpointError, PlanError
from adatsq.quant.gptq import gptq
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import WEIGHT_BITS, ActScheme, WeightScheme, fake_quant_activation


def _linear(out_f=48, in_f=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize(("group_size", "act_order"), [(None, False), (32, False), (32, True), (64, True)])
def test_forward_matches_dequantized_linear(bits, group_size, act_order):
    W, b = _linear()
    X = torch.randn(300, 100)
    qw = gptq(W, X.T @ X, WeightScheme(bits, group_size, symmetric=False), act_order=act_order).weight
    layer = QuantLinear.from_quantized(qw, b, ActScheme(8))
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())
    x = torch.randn(2, 7, 100)
    expected = F.linear(fake_quant_activation(x, ActScheme(8)), qw.dequantize(), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (2, 7, 48)


def test_bfloat16_inputs_and_no_bias():
    W, _ = _linear()
    layer = QuantLinear.from_quantized(rtn(W, WeightScheme(4, 32)), None, ActScheme())
    x = torch.randn(5, 100)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.1)


def test_memory_really_shrinks():
    out_f, in_f = 256, 512
    W, b = _linear(out_f, in_f)
    dense = nn.Linear(in_f, out_f)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    for bits in WEIGHT_BITS:
        layer = QuantLinear.from_quantized(rtn(W, WeightScheme(bits, 128)), b, ActScheme())
        assert not list(layer.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        # packed codes + float16 scales + uint8 zeros per group + float32 bias
        assert nbytes == out_f * in_f * bits // 8 + out_f * (in_f // 128) * 3 + out_f * 4
        assert nbytes < dense_bytes * (bits / 32 + 0.01)


def test_state_dict_round_trip_through_the_constructor():
    W, b = _linear()
    X = torch.randn(200, 100)
    qw = gptq(W, X.T @ X, WeightScheme(3, 32), act_order=True).weight
    layer = QuantLinear.from_quantized(qw, b, ActScheme(4))
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}  # act-order: static groups, nothing extra
    assert sd["qweight"].dtype == torch.uint8 and sd["scales"].dtype == torch.float16
    rebuilt = QuantLinear(sd["qweight"], sd["scales"], sd["zeros"], sd["bias"], 3, 32, 100, ActScheme(4))
    x = torch.randn(3, 100)
    assert torch.equal(rebuilt(x), layer(x))
    with pytest.raises(CheckpointError, match="qweight"):
        QuantLinear(sd["qweight"], sd["scales"], sd["zeros"], None, 4, 32, 100, ActScheme())
    with pytest.raises(CheckpointError, match="scales"):
        QuantLinear(sd["qweight"], sd["scales"], sd["zeros"], None, 3, 64, 100, ActScheme())


def test_activation_quant_error_small_at_8_bits():
    W, b = _linear(64, 256)
    qw = rtn(W, WeightScheme(8, None))
    x = torch.randn(64, 256)
    ref = QuantLinear.from_quantized(qw, b, ActScheme())(x)
    rel = {
        bits: float((QuantLinear.from_quantized(qw, b, ActScheme(bits))(x) - ref).norm() / ref.norm())
        for bits in (8, 4)
    }
    assert rel[8] < 0.01 and rel[4] > 5 * rel[8], rel


def test_timestep_layer_picks_variant():
    W, b = _linear()
    variants = [QuantLinear.from_quantized(rtn(W, WeightScheme(bits, 32)), b, ActScheme()) for bits in (8, 3)]
    layer = TimestepQuantLinear(variants, segment_bits=(3, 8, 8, 3))
    assert list(layer.variants) == ["w3", "w8"]
    assert (layer.in_features, layer.out_features) == (100, 48)
    x = torch.randn(4, 100)
    outputs = {bits: layer.variants[f"w{bits}"](x) for bits in (3, 8)}
    assert not torch.equal(outputs[3], outputs[8])
    for segment, bits in enumerate((3, 8, 8, 3)):
        layer.set_segment(segment)
        assert layer.active_bits == bits
        assert torch.equal(layer(x), outputs[bits])
    # each variant is stored once; the segment table survives copies and dtype/device moves
    assert set(layer.state_dict()) == {
        f"variants.w{b}.{n}" for b in (3, 8) for n in ("qweight", "scales", "zeros", "bias")
    }
    clone = copy.deepcopy(layer).to(torch.float64)
    clone.set_segment(1)
    assert clone(x.double()).dtype == torch.float64
    assert clone._segment_variants[1] is clone.variants["w8"]
    with pytest.raises(PlanError, match="segment 4"):
        layer.set_segment(4)
    by_mapping = TimestepQuantLinear({3: variants[1], 8: variants[0]}, (8, 3))
    assert torch.equal(by_mapping(x), outputs[8])


def test_timestep_layer_rejects_inconsistent_plans():
    W, b = _linear()
    v4 = QuantLinear.from_quantized(rtn(W, WeightScheme(4, 32)), b, ActScheme())
    v8 = QuantLinear.from_quantized(rtn(W, WeightScheme(8, 32)), b, ActScheme())
    with pytest.raises(PlanError):
        TimestepQuantLinear([v4], (4, 8))
    with pytest.raises(PlanError):
        TimestepQuantLinear([v4, v8], (4, 4))
    with pytest.raises(PlanError):
        TimestepQuantLinear([v4, v4], (4,))
    with pytest.raises(PlanError, match="wrong bit-width"):
        TimestepQuantLinear({8: v4}, (8,))
    other = QuantLinear.from_quantized(rtn(W[:, :64], WeightScheme(8, 32)), b, ActScheme())
    with pytest.raises(PlanError, match="disagree"):
        TimestepQuantLinear([v4, other], (4, 8))
