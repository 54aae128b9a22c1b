"""Quantize the shipped reference DiT with small recipes, save, load back, and damage the files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adatsq
from adatsq.checkpoint.load import load_checkpoint
from adatsq.errors import CheckpointError, ConfigError
from adatsq.quant.linear import QuantLinear


@pytest.fixture
def saved(quantized_reference):
    return quantized_reference("gptq", 4)


# format 2: the reference DiT is the checkpoint's transformer/ component
CONFIG, WEIGHTS = "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"


def test_round_trip_samples_identically(saved):
    qmodel, directory = saved
    pipe = adatsq.load(directory)
    labels = [0, 3, 7]
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    before = qmodel.model(labels, num_inference_steps=4, latents=noise.clone()).images
    after = pipe(labels, num_inference_steps=4, latents=noise.clone()).images
    torch.testing.assert_close(after, before)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(qmodel.layers) >= 40


def test_load_in_bfloat16_prepares_the_kernels(saved):
    qmodel, directory = saved
    pipe = adatsq.load(directory, dtype=torch.bfloat16)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert pipe.transformer.dtype == torch.bfloat16 and len(layers) == len(qmodel.layers)
    for m in layers:
        assert m._kernel_state is not None and m._kernel_state.key[2] == torch.bfloat16  # built at load
        assert m.kernel == m.kernel_for("cpu", torch.bfloat16) == "dequant-cached+fake-a8"
        assert m.scales.dtype == torch.float16  # the grid stays exact
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    images = pipe([1, 2], num_inference_steps=2, latents=noise.clone()).images
    reference = adatsq.load(directory)([1, 2], num_inference_steps=2, latents=noise.clone()).images
    assert images.dtype == torch.bfloat16 and (images.float() - reference).abs().max() < 0.1
    assert adatsq.load(directory, dtype="bfloat16").transformer.dtype == torch.bfloat16


def test_files_and_report(saved):
    _, directory = saved
    config = json.loads((directory / CONFIG).read_text())["quantization_config"]
    report = json.loads((directory / "report.json").read_text())
    assert config["method"] == "gptq" and config["model"] == {"family": "reference", "source": "reference"}
    assert report["checkpoint_bytes"] == (directory / WEIGHTS).stat().st_size
    assert all(v["w4"]["damp"] > 0 for v in report["layers"].values())
    assert not any(p.name.endswith(".partial") for p in directory.parent.iterdir())


def test_existing_output_needs_overwrite(saved, tmp_path):
    qmodel, directory = saved
    with pytest.raises(ConfigError, match="--overwrite"):
        qmodel.save(directory)
    assert qmodel.save(directory, overwrite=True) == directory
    assert not any(p.name.startswith(".") for p in directory.parent.iterdir())


def test_truncated_weights_are_a_clear_error(saved, tmp_path):
    _, directory = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in directory.rglob("*"):
        target = broken / item.relative_to(directory)
        if item.is_file():
            target.write_bytes(item.read_bytes())
        else:
            target.mkdir()
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(broken)


def test_config_that_does_not_match_tensors(saved, tmp_path):
    _, directory = saved
    tensors = load_file(str(directory / WEIGHTS))
    config = json.loads((directory / CONFIG).read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    mismatch = tmp_path / "mismatch"
    (mismatch / "transformer").mkdir(parents=True)
    (mismatch / "reference_base.json").write_bytes((directory / "reference_base.json").read_bytes())
    config["quantization_config"]["layers"][name]["bits"] = [8]
    (mismatch / CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(mismatch / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{name}.*8-bit variant"):
        load_checkpoint(mismatch)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        adatsq.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match=r"is not an adatsq checkpoint: neither adatsq_config\.json"):
        adatsq.load(tmp_path)


def test_quantized_model_is_smaller_than_float(make_recipe):
    from adatsq.models.reference.model import load_reference_transformer

    fp_bytes = sum(p.numel() * 4 for p in load_reference_transformer().parameters())
    qmodel = adatsq.quantize("reference", make_recipe(method="rtn", bits=4), progress=False)
    held = sum(b.numel() * b.element_size() for b in qmodel.adapter.denoiser().state_dict().values())
    assert held < 0.35 * fp_bytes
