"""`adatsq estimate` on the shipped full-size configs, against FACTS.md, and its CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from adatsq.cli import main
from adatsq.engine.estimate import estimate
from adatsq.errors import ConfigError
from adatsq.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RECIPE = ROOT / "recipes" / "scale" / "gptq-w4a16.yaml"
GiB = 2**30

# config -> (published params in B, targeted Linear, float32 accumulators in GiB at 1 / 4 segments);
# FACTS.md "Memory of calibration on full-size configs", "float32 + one XᵀX per distinct input".
FACTS = {
    "flux.1-dev": (11.9, 494, 63, 251),
    "wan2.1-t2v-14b": (14.3, 400, 48, 192),
    "z-image-turbo": (6.2, 270, 19, 76),
    "sd3.5-large": (8.1, 529, 33, 132),
    "wan2.1-t2v-1.3b": (1.4, 300, 10, 41),
}
# float64, one XᵀX per layer per segment (today's runner), GiB at 1 / 4 segments
TODAY = {
    "flux.1-dev": (139, 556),
    "wan2.1-t2v-14b": (127, 509),
    "z-image-turbo": (49, 196),
    "sd3.5-large": (73, 292),
}


def _recipe(segments: int):
    r = load_recipe(RECIPE)
    return replace(r, calibration=replace(r.calibration, segments=segments))


@pytest.mark.parametrize("name", sorted(FACTS))
def test_shipped_configs_match_the_facts(name):
    params, layers, acc1, acc4 = FACTS[name]
    one = estimate(CONFIGS / name, _recipe(1))
    four = estimate(CONFIGS / name, _recipe(4))
    assert round(one.params / 1e9, 1) == params
    assert one.layers == layers
    assert round(one.accumulator_bytes / GiB) == acc1 and round(four.accumulator_bytes / GiB) == acc4
    if name in TODAY:
        assert (round(one.float64_per_layer_bytes / GiB), round(four.float64_per_layer_bytes / GiB)) == TODAY[
            name
        ]
    assert four.peak_device_bytes <= four.budget_bytes and four.passes >= one.passes


def test_other_shipped_configs_build():
    assert round(estimate(CONFIGS / "flux.1-schnell", _recipe(1)).params / 1e9, 1) == 11.9
    qwen = estimate(CONFIGS / "qwen-image", _recipe(1))
    assert round(qwen.params / 1e9, 1) == 20.4


def test_flux_recorded_inputs_and_one_block():
    est = estimate(CONFIGS / "flux.1-dev", _recipe(1))
    assert 1.9e9 < est.recorded_bytes < 2.2e9  # FACTS.md: ~2 GB for 64 prompts × 50 steps at 1024²
    assert round(est.one_block_bytes / GiB, 1) == 1.4
    assert est.assumptions["height"] == 1024 and est.assumptions["text_tokens"] == 512


def test_devices_lower_the_per_device_need():
    one = estimate(CONFIGS / "wan2.1-t2v-1.3b", _recipe(4), max_memory="20GiB")
    two = estimate(CONFIGS / "wan2.1-t2v-1.3b", _recipe(4), max_memory="20GiB", devices=2)
    assert len(two.per_device_peak_bytes) == 2 and two.passes == -(-one.passes // 2)


def test_cli_json_keys(capsys):
    adatsq_recipe = ROOT / "recipes" / "scale" / "adatsq-w4a8.yaml"
    assert main(["estimate", str(CONFIGS / "flux.1-dev"), "--recipe", str(adatsq_recipe), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params", "layers", "accumulator_bytes", "passes", "peak_device_bytes", "peak_host_bytes"):
        assert isinstance(out[key], int)
    assert (
        len(out["schedule"]) == out["passes"]
        and out["schedule"][-1]["run_to"] == "single_transformer_blocks.37"
    )
    assert out["checkpoint_bytes"] > 0 and out["search"]["trajectories"] == 6 + 4 * 6 * 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-memory", "40GX"], "is not a size"),
        (["--max-memory", "20GiB"], "too small: layer"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(argv, message, capsys):
    code = main(["estimate", str(CONFIGS / "flux.1-dev"), "--recipe", str(RECIPE), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_config_only_folder_without_transformer_config(tmp_path, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    shutil.copy(CONFIGS / "flux.1-dev" / "model_index.json", folder)
    assert main(["estimate", str(folder), "--recipe", str(RECIPE)]) == 2
    err = capsys.readouterr().err
    assert "transformer/config.json" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["estimate", str(tmp_path / "empty"), "--recipe", str(RECIPE)]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err


def test_reference_and_a_weighted_pipeline_folder(tiny_pipeline_dir):
    ref = estimate(
        "reference", load_recipe(ROOT / "recipes" / "reference" / "gptq-w4a8.yaml"), dtype="float32"
    )
    assert ref.layers == 56 and ref.passes == 1
    flux = estimate(tiny_pipeline_dir("flux"), _recipe(4), max_memory="1GiB", dtype="float32")
    assert flux.params > 0 and flux.passes == 1


def test_streamed_weights_fit_a_smaller_budget():
    with pytest.raises(ConfigError, match=r"smallest feasible budget.*--weights stream"):
        estimate(CONFIGS / "flux.1-dev", _recipe(4), max_memory="20GiB")
    streamed = estimate(CONFIGS / "flux.1-dev", _recipe(4), max_memory="20GiB", weights="stream")
    assert streamed.weights_bytes < 1 * GiB and streamed.peak_device_bytes <= 20 * GiB
