"""GPTQModel quantize_config.json, checked against GPTQModel 7.7's documented format (it does not
install here): the keys QuantizeConfig.to_dict writes, and `dynamic` resolved as GPTQModel resolves it
(first `+:` / `-:` pattern that matches from the start; `^literal$` patterns are exact names)."""

import json
import re

import pytest

from adatsq.errors import ExportError
from adatsq.export.base import Selection
from adatsq.export.convert import export
from adatsq.quant.scheme import WeightScheme

# QuantizeConfig.to_dict (gptqmodel/quantization/config.py, 7.7.0) and its dynamic override fields
TOP_KEYS = {"bits", "dynamic", "group_size", "desc_act", "lm_head", "activation", "method", "quant_method",
            "format", "checkpoint_format", "pack_dtype", "rotation", "meta", "sym"}  # fmt: skip
OVERRIDE_KEYS = {"bits", "group_size", "sym", "desc_act", "mse", "pack_dtype"}
GROUP_SIZES = {-1, 16, 32, 64, 128, 256, 512, 1024}


def resolve(config, module):
    """GPTQModel's rule: the first matching pattern decides; '-:' skips, '+:' (or none) overrides."""
    for pattern, override in (config.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        if re.match(raw, module):
            return None if negative else {**config, **override}
    return config


def check_schema(config):
    assert set(config) <= TOP_KEYS and {"bits", "group_size", "sym", "method", "format"} <= set(config)
    assert config["method"] == config["quant_method"] == "gptq" and config["pack_dtype"] == "int32"
    assert config["format"] == config["checkpoint_format"] in ("gptq", "gptq_p")
    for pattern, override in (config.get("dynamic") or {}).items():
        assert pattern[:2] in ("+:", "-:") and pattern[2] == "^" and pattern.endswith("$")
        assert set(override) <= OVERRIDE_KEYS and (override or pattern.startswith("-:"))
    for scheme in [config, *(config.get("dynamic") or {}).values()]:
        assert scheme.get("bits", 4) in range(2, 9) and scheme.get("group_size", 128) in GROUP_SIZES


def read(out):
    return json.loads((out / "quantize_config.json").read_text())


def test_mixed_checkpoint_overrides_each_layer_that_differs(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint(mixed=True)
    kept = {}
    for name, selection in (("seg0", Selection(0)), ("max", Selection())):
        export(checkpoint, "gptqmodel", tmp_path / name, selection)
        config = read(tmp_path / name)
        check_schema(config)
        record = json.loads((tmp_path / name / "adatsq_export.json").read_text())
        for layer, info in record["layers"].items():
            assert resolve(config, layer) is not None
            assert (resolve(config, layer)["bits"], resolve(config, layer)["group_size"]) == (
                info["bits"],
                32,
            )
            assert resolve(config, layer)["sym"] is False
        assert resolve(config, "proj_out_1") is None  # float layers are skipped
        kept[name] = config
    assert kept["max"]["format"] == "gptq_p"  # a 6-bit layer: GPTQModel's planar layout
    assert kept["seg0"]["meta"]["adatsq_export"]["selection"].startswith("the variant of timestep segment 0")
    assert kept["seg0"]["desc_act"] is True and kept["seg0"]["meta"]["static_groups"] is True


def test_per_channel_is_group_size_minus_one(make_checkpoint, tmp_path):
    export(make_checkpoint(group=None), "gptqmodel", tmp_path / "g")
    config = read(tmp_path / "g")
    check_schema(config)
    assert config["group_size"] == -1 and all(k.startswith("-:") for k in config["dynamic"])


def test_plan_exports_with_the_recipes_scheme(plan_file, tmp_path):
    path = plan_file({"blocks.0.a": (4, 8), "blocks.0.b": (4, 4), "blocks.1.a": (3, 4)})
    summary = export(path, "gptqmodel", tmp_path / "g", Selection(1), weight=WeightScheme(4, 64, False))
    config = read(tmp_path / "g")
    check_schema(config)
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 64, False)
    assert config["dynamic"] == {r"+:^blocks\.0\.a$": {"bits": 8, "group_size": 64, "sym": False}}
    assert "desc_act" not in config  # a plan carries no GPTQ settings: GPTQModel's default applies
    assert "timestep segment 1" in summary


def test_group_size_gptqmodel_does_not_accept_is_refused(make_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"group_size 48; GPTQModel accepts \[-1, 16"):
        export(make_checkpoint(method="rtn", group=48), "gptqmodel", tmp_path / "g")
