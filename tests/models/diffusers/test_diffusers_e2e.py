"""The whole product on tiny offline diffusers pipelines: CLI quantize → load → sample, and AdaTSQ."""

import json

import pytest
import torch

import adatsq
from adatsq.cli import main
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear
from adatsq.recipe import recipe_from_dict

GPTQ = "method: gptq\nweight: {bits: 4, group_size: 16, symmetric: false}\nactivation: {bits: 8}\n" \
    "calibration: {samples: 4, steps: 4, batch_size: 2}\n"  # fmt: skip


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "z-image"])
def test_cli_quantize_load_and_sample(family, tiny_pipeline_dir, tmp_path, capsys):
    source = tiny_pipeline_dir(family)
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ)
    out = tmp_path / "quantized"
    assert main(["quantize", str(source), "--recipe", str(recipe), "--out", str(out)]) == 0
    assert main(["eval", str(out), "--samples", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["psnr_db"] > 20 and metrics["avg_bits"] == 4.0 and metrics["accuracy"] is None
    pipe = adatsq.load(out)
    quantized = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    config = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
    assert len(quantized) == len(config["layers"])
    # the transformer's one tensor file holds its quantized and float tensors alike
    assert [p.name for p in (out / "transformer").glob("*.safetensors")] == [
        "diffusion_pytorch_model.safetensors"
    ]


def test_adatsq_plans_and_switches_on_flux(tiny_pipeline_dir, tmp_path):
    source = tiny_pipeline_dir("flux")
    recipe = recipe_from_dict(
        {
            "method": "adatsq",
            "weight": {"bits": 4, "group_size": 16, "symmetric": False},
            "activation": {"bits": 8},
            "calibration": {"samples": 2, "steps": 4, "batch_size": 2, "segments": 2},
            "planner": {"candidates": [3, 4, 8], "fisher_samples": 2, "measure_samples": 2, "beam_width": 2},
        }
    )
    qmodel = adatsq.quantize(str(source), recipe, progress=False)
    assert qmodel.report["fisher"]["method"] == "perturbation"  # diffusers pipelines run under no_grad
    assert qmodel.plan.metrics["avg_bits"] <= 4.0 + 1e-9
    qmodel.save(tmp_path / "out")
    pipe = adatsq.load(tmp_path / "out")
    rows = {n: r for n, r in qmodel.plan.layers.items() if len(set(r)) > 1}
    assert len([m for m in pipe.transformer.modules() if isinstance(m, TimestepQuantLinear)]) == len(rows)
    before = qmodel.adapter.generate(["a red fox"], seed=3, num_steps=4)
    after = adatsq.checkpoint.load.load_checkpoint(tmp_path / "out")[0].generate(
        ["a red fox"], seed=3, num_steps=4
    )
    torch.testing.assert_close(after, before)


def test_inspect_lists_layers_of_a_float_pipeline(tiny_pipeline_dir, capsys):
    source = tiny_pipeline_dir("flux")
    assert main(["inspect", str(source)]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn.to_q" in out and "default ignore" in out and "sensitive (adaLN)" in out
