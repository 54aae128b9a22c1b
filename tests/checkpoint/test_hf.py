"""A quantized checkpoint is a diffusers / transformers folder: their from_pretrained loads it, after
registration, into the very model adatsq.load builds (same samples bit for bit, switching included)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from diffusers.quantizers import auto as diffusers_auto
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import adatsq
from adatsq.checkpoint import hf
from adatsq.checkpoint.save import save_component
from adatsq.errors import ConfigError
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.recipe import recipe_from_dict

WEIGHT = {"bits": 4, "group_size": 16, "symmetric": False}
CALIBRATION = {"samples": 2, "steps": 4, "batch_size": 2}
PLANNER = {"candidates": [3, 4, 8], "fisher_samples": 2, "measure_samples": 2, "beam_width": 2}
RECIPES = {
    "gptq": {"method": "gptq", "weight": WEIGHT, "activation": {"bits": 8},
             "calibration": {**CALIBRATION, "segments": 1}},
    "adatsq": {"method": "adatsq", "weight": WEIGHT, "activation": {"bits": 8},
               "calibration": {**CALIBRATION, "segments": 2}, "planner": PLANNER},
}  # fmt: skip
CALL = {"prompt": ["a red fox"], "height": 16, "width": 16, "num_inference_steps": 4}
CALL["max_sequence_length"] = 8


@pytest.fixture(scope="module")
def saved(tiny_pipeline_dir, tmp_path_factory):
    """method -> the tiny Flux pipeline quantized with it, saved (built once per module)."""
    built = {}

    def get(method: str):
        if method not in built:
            recipe = recipe_from_dict(RECIPES[method])
            qmodel = adatsq.quantize(str(tiny_pipeline_dir("flux")), recipe, progress=False)
            built[method] = qmodel.save(tmp_path_factory.mktemp("hf") / method)
        return built[method]

    return get


def sample(pipe, seed: int = 3) -> torch.Tensor:
    return pipe(**CALL, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def bits_per_call(transformer: torch.nn.Module) -> list[int]:
    """Install a recorder of the active bits of the first switching layer at every transformer call."""
    layer = next(m for m in transformer.modules() if isinstance(m, TimestepQuantLinear))
    seen: list[int] = []
    transformer.register_forward_pre_hook(lambda *_: seen.append(layer.active_bits))  # after the switch hook
    return seen


def test_the_folder_is_a_normal_pipeline_folder(saved):
    directory = saved("gptq")
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    config = json.loads((directory / "transformer" / "config.json").read_text())
    quantization = config["quantization_config"]
    assert config["_class_name"] == "FluxTransformer2DModel" and config["num_layers"] == 2
    assert quantization["quant_method"] == "adatsq" and quantization["format_version"] == 2
    assert quantization["method"] == "gptq" and quantization["layers"]
    assert (directory / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (directory / "text_encoder" / "model.safetensors").is_file() and (directory / "vae").is_dir()
    assert not (directory / "adatsq_config.json").exists() and not (directory / "base").exists()


@pytest.mark.parametrize("method", ["gptq", "adatsq"])
def test_diffusion_pipeline_from_pretrained_samples_as_adatsq_load(saved, method):
    directory = saved(method)
    adatsq.register_with_diffusers()
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory)
    ours = adatsq.load(directory)
    config = json.loads((directory / "transformer" / "config.json").read_text())
    kinds = {type(pipe.transformer.get_submodule(name)) for name in config["quantization_config"]["layers"]}
    assert type(pipe) is type(ours)
    assert kinds == ({QuantLinear} if method == "gptq" else {QuantLinear, TimestepQuantLinear})
    if method == "adatsq":
        seen, seen_ours = bits_per_call(pipe.transformer), bits_per_call(ours.transformer)
    images = sample(pipe)
    assert torch.equal(images, sample(ours))
    assert not torch.equal(images, sample(pipe, seed=4))  # the comparison can tell samples apart
    if method == "adatsq":  # switching is attached: a switching layer changes bits between the segments
        assert seen[:4] == seen_ours[:4] and len(set(seen[:4])) == 2, seen


def test_the_transformer_component_loads_alone(saved):
    directory = saved("adatsq")
    adatsq.register_with_diffusers()
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(directory / "transformer")
    ours = adatsq.load(directory).transformer
    assert any(isinstance(m, TimestepQuantLinear) for m in transformer.modules())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "txt_ids": torch.zeros(8, 3),
        "img_ids": torch.zeros(16, 3),
        "guidance": torch.tensor([3.5]),
    }
    with torch.no_grad():
        for t in (1.0, 0.1):  # the first and the last segment
            out = transformer(**inputs, timestep=torch.tensor([t])).sample
            assert torch.equal(out, ours(**inputs, timestep=torch.tensor([t])).sample)


def test_registration_is_idempotent_and_version_checked(monkeypatch):
    adatsq.register_with_diffusers()
    first = dict(diffusers_auto.AUTO_QUANTIZER_MAPPING)
    adatsq.register_with_diffusers()
    assert first == diffusers_auto.AUTO_QUANTIZER_MAPPING
    assert first["adatsq"] is hf.AdatsqDiffusersQuantizer
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["adatsq"] is hf.AdatsqDiffusersConfig
    adatsq.register_with_transformers()
    adatsq.register_with_transformers()
    monkeypatch.setattr(diffusers, "__version__", "0.30.0")
    with pytest.raises(ConfigError) as err:
        adatsq.register_with_diffusers()
    text = str(err.value)
    assert "\n" not in text and f"diffusers {hf.SUPPORTED_DIFFUSERS}, this is diffusers 0.30.0" in text
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    expected = f"transformers {hf.SUPPORTED_TRANSFORMERS}, this is transformers 4.56.0"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        adatsq.register_with_transformers()


def test_a_quantized_transformers_model_loads_with_auto_model(tmp_path):
    """The reference UMM's language model is a transformers Qwen2ForCausalLM: its decoder layers are
    what adatsq quantizes; written as its own component, AutoModelForCausalLM loads it."""
    recipe = {**RECIPES["gptq"], "weight": {"bits": 4, "group_size": 32, "symmetric": False}}
    qmodel = adatsq.quantize("umm", recipe_from_dict(recipe), progress=False)
    save_component(qmodel, "model.lm", tmp_path / "lm")
    adatsq.register_with_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert type(model) is transformers.Qwen2ForCausalLM
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the UMM keeps everything but the decoder in float
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, qmodel.adapter.model.lm(input_ids=ids).logits)


def test_the_dev_install_stays_in_the_supported_ranges():
    """`make setup` installs with constraints.txt: a fresh clone must get the versions the integration
    accepts, not whatever was released last night."""
    lines = (Path(__file__).parents[2] / "constraints.txt").read_text().splitlines()
    pins = dict(line.split(">=", 1) for line in lines if line and not line.startswith("#"))
    assert pins == {
        "diffusers": hf.SUPPORTED_DIFFUSERS.removeprefix(">="),
        "transformers": hf.SUPPORTED_TRANSFORMERS.removeprefix(">="),
    }
    assert Version(diffusers.__version__) in SpecifierSet(hf.SUPPORTED_DIFFUSERS)
    assert Version(transformers.__version__) in SpecifierSet(hf.SUPPORTED_TRANSFORMERS)
