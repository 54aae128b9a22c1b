"""engine/uniform.py and engine/surgery.py: which layers get quantized, into what, and with which bits."""

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

import adatsq.engine.passes
from adatsq.engine.surgery import select_layers
from adatsq.engine.uniform import quantize
from adatsq.errors import CalibrationError, ConfigError
from adatsq.models.resolve import adapter_for
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import WeightScheme


def float_linears(adapter):
    return {n: m for n, m in adapter.denoiser().named_modules() if isinstance(m, nn.Linear)}


def test_selection_honours_targets_and_ignore(tiny_adapter, make_recipe):
    adapter = tiny_adapter()
    before = float_linears(adapter)
    targets, ignore = [r"attn1\.", r"ff\."], [r"to_out", r"net\.2"]
    recipe = make_recipe("rtn", bits=3, targets=targets, ignore=ignore)
    expected = {
        n
        for n in before
        if any(re.search(t, n) for t in targets) and not any(re.search(i, n) for i in ignore)
    }
    assert 0 < len(expected) < len(before)
    qmodel = quantize(adapter, recipe, progress=False)
    modules = dict(adapter.denoiser().named_modules())
    assert set(qmodel.layers) == expected
    for name in before:
        if name in expected:
            layer = modules[name]
            assert type(layer) is QuantLinear, name
            assert (layer.bits, layer.group_size) == (3, 32)
            assert (layer.in_features, layer.out_features) == (
                before[name].in_features,
                before[name].out_features,
            )
        else:
            assert modules[name] is before[name]  # untouched: the very same float module


def test_default_ignore_applies_when_the_recipe_gives_none(tiny_adapter, make_recipe):
    adapter = tiny_adapter()
    defaults = adapter.default_ignore()
    names = set(float_linears(adapter))
    kept = {n for n in names if any(re.search(p, n) for p in defaults)}
    assert kept  # the reference family keeps its embedders / final projection in float
    qmodel = quantize(adapter, make_recipe("rtn"), progress=False)
    assert set(qmodel.layers) == names - kept
    assert qmodel.ignore == tuple(defaults)
    everything = quantize(tiny_adapter(), make_recipe("rtn", ignore=[]), progress=False)
    assert set(everything.layers) == names


def test_rtn_needs_no_calibration_and_stores_rtn_codes(tiny_adapter, make_recipe, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(adatsq.engine.passes, "collect_stats", no_calibration)
    with pytest.raises(AssertionError, match="calibration ran"):  # the patch is where gptq looks for it
        quantize(tiny_adapter(), make_recipe("gptq"), progress=False)
    adapter = tiny_adapter()
    weights = {n: m.weight.detach().clone() for n, m in float_linears(adapter).items()}
    qmodel = quantize(adapter, make_recipe("rtn", bits=4), progress=False)
    modules = dict(adapter.denoiser().named_modules())
    scheme = WeightScheme(4, 32, symmetric=False)
    for name in qmodel.layers:
        torch.testing.assert_close(
            modules[name].dequantized_weight(), rtn(weights[name], scheme).dequantize(), rtol=0, atol=0
        )


def test_plan_bits_per_segment_build_switching_layers(tiny_adapter, make_recipe):
    adapter = tiny_adapter()
    recipe = make_recipe("gptq", segments=2)
    names = sorted(select_layers(adapter, recipe))
    rows = {name: ((3, 8), (8, 3), (4, 4), (6, 6))[i % 4] for i, name in enumerate(names)}
    qmodel = quantize(adapter, recipe, layer_bits=rows, progress=False)
    modules = dict(adapter.denoiser().named_modules())
    for name, row in rows.items():
        layer = modules[name]
        assert qmodel.layers[name].bits == row
        if len(set(row)) > 1:
            assert isinstance(layer, TimestepQuantLinear) and layer.segment_bits == row
            assert {v.bits for v in layer.variants.values()} == set(row)
        else:
            assert type(layer) is QuantLinear and layer.bits == row[0]
    # the solves saw calibration data: each variant reports its GPTQ loss
    assert all("loss" in info for report in qmodel.report["layers"].values() for info in report.values())


def test_select_layers_fails_loudly_when_nothing_matches(tiny_adapter, make_recipe):
    with pytest.raises(ConfigError, match=r"targets pattern 'nothing_here' matches no Linear layer"):
        select_layers(tiny_adapter(), make_recipe("rtn", targets=["nothing_here"]))
    with pytest.raises(CalibrationError, match="adatsq inspect"):  # everything targeted is ignored
        select_layers(tiny_adapter(), make_recipe("rtn", ignore=[".*"]))


@pytest.mark.parametrize(
    "field, patterns",
    [
        ("targets", [r"transformer_blocks\.0\.attn1\.to_q", r"transformer_block\.0\.attn9"]),
        ("ignore", ["proj_out_3"]),
    ],
)
def test_a_pattern_that_matches_nothing_is_an_error(make_recipe, field, patterns):
    """Nothing fails open: a typo in one pattern would otherwise silently quantize (or keep) other layers."""
    recipe = replace(make_recipe(method="rtn"), **{field: tuple(patterns)})
    with pytest.raises(ConfigError, match=rf"{field} pattern '{re.escape(patterns[-1])}' matches no Linear"):
        select_layers(adapter_for("reference"), recipe)
