"""torchao FqnToConfig recipe: its JSON shape here, and with torchao installed (the bench venv), that
config_from_dict rebuilds it and quantize_ applies each layer's scheme to the float model."""

import json

import pytest
import torch

from adatsq.checkpoint.validate import open_checkpoint
from adatsq.errors import ExportError
from adatsq.export.base import Selection
from adatsq.export.convert import export


def read(out):
    return json.loads((out / "torchao_config.json").read_text())


def test_recipe_names_every_quantized_layer(make_checkpoint, tmp_path):
    export(make_checkpoint(mixed=True), "torchao", tmp_path / "t", Selection(1))
    recipe = read(tmp_path / "t")
    assert recipe["_type"] == "FqnToConfig" and recipe["_version"] == 1
    configs = recipe["_data"]["fqn_to_config"]
    record = json.loads((tmp_path / "t" / "adatsq_export.json").read_text())
    assert set(configs) == set(record["layers"])
    for name, config in configs.items():
        assert config["_type"] == "IntxWeightOnlyConfig"
        assert config["_data"]["weight_dtype"] == {
            "_type": "torch.dtype",
            "_data": f"int{record['layers'][name]['bits']}",
        }
        assert config["_data"]["mapping_type"]["_data"] == "ASYMMETRIC"
    assert any("re-quantizes" in line for line in record["loses"])


def test_a4_and_partial_groups_are_refused(make_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="activations to 4 bits"):
        export(make_checkpoint(method="rtn", act=4), "torchao", tmp_path / "t")
    with pytest.raises(ExportError, match="PerGroup needs whole groups"):
        export(make_checkpoint(method="rtn", group=48), "torchao", tmp_path / "t")


CASES = [
    {"group": 32},  # IntxWeightOnlyConfig
    {"group": None, "act": 8, "sym": True},  # Int8DynamicActivationIntxWeightConfig (asymmetric activations)
    {"group": None, "act": 8, "sym": True, "bits": 8},  # Int8DynamicActivationInt8WeightConfig (exact)
]


def test_w8a8_per_channel_maps_exactly(make_checkpoint, tmp_path):
    export(make_checkpoint(**CASES[2]), "torchao", tmp_path / "t")
    configs = read(tmp_path / "t")["_data"]["fqn_to_config"].values()
    assert {c["_type"] for c in configs} == {"Int8DynamicActivationInt8WeightConfig"}
    record = json.loads((tmp_path / "t" / "adatsq_export.json").read_text())
    assert not any("asymmetrically" in line for line in record["loses"])
    export(make_checkpoint(**CASES[1]), "torchao", tmp_path / "t4")
    record = json.loads((tmp_path / "t4" / "adatsq_export.json").read_text())
    assert any("asymmetrically" in line for line in record["loses"])


@pytest.mark.parametrize("case", CASES)
def test_torchao_applies_the_recipe(make_checkpoint, tmp_path, case):
    pytest.importorskip("torchao")
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    checkpoint = make_checkpoint(**case)
    export(checkpoint, "torchao", tmp_path / "t")
    config = config_from_dict(read(tmp_path / "t"))
    model = open_checkpoint(checkpoint).adapter.denoiser()
    quantize_(model, config, filter_fn=None)
    record = json.loads((tmp_path / "t" / "adatsq_export.json").read_text())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            if name not in record["layers"]:
                assert type(weight) is torch.nn.Parameter
                continue
            if case.get("bits") == 8:  # torchao's int8 tensor: per-row scales, per-token activations
                assert type(weight).__name__ == "Int8Tensor" and weight.act_quant_kwargs is not None
                continue
            assert weight.target_dtype == torch.int4
            assert tuple(weight.block_size) == (1, 32 if case["group"] else module.in_features)
            assert (weight.activation_quantization is not None) == ("act" in case)
    images = model(torch.randn(2, 1, 16, 16), torch.tensor([500.0, 20.0]), torch.tensor([3, 7]))
    assert torch.isfinite(images.sample).all()
