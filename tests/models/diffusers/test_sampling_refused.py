"""A sampling setting the pipeline refuses ends `adatsq quantize` with one line naming it and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adatsq.errors import ConfigError, SamplingError
from adatsq.models.diffusers.adapter import DiffusersPipelineAdapter
from adatsq.models.diffusers.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[3]
RECIPE = "method: gptq\nweight: {bits: 4, group_size: 16}\ncalibration: {samples: 2, steps: 2, batch_size: 2}"


def edit_settings(folder: Path, **extra) -> None:
    settings = json.loads((folder / "adatsq_pipeline.json").read_text())
    settings["sampling"]["extra"] = {k: v for k, v in {**settings["sampling"]["extra"], **extra}.items()
                                     if v is not None}  # fmt: skip
    (folder / "adatsq_pipeline.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """Tiny PixArt-Sigma, its transformer's sample_size changed to 16 and resolution binning on."""
    folder = build_tiny_pipeline("pixart-sigma", tmp_path_factory.mktemp("pixart") / "pipe")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "sample_size": 16}))
    edit_settings(folder, use_resolution_binning=None)
    return folder


def test_cli_prints_one_line_and_exits_2(pixart, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["quantize", str(pixart), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "q")]
    result = subprocess.run(
        [sys.executable, "-m", "adatsq.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("adatsq: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert "PixArtSigmaPipeline refused to sample with height=16, width=16" in line
    assert "Invalid sample size" in line and "(this one's is 16)" in line
    settings = pixart / "adatsq_pipeline.json"
    assert f'set "use_resolution_binning": false under sampling.extra in {settings}' in line
    assert not (tmp_path / "q").exists()


def test_the_error_chains_the_pipelines_and_the_fix_works(pixart, tmp_path):
    adapter = DiffusersPipelineAdapter.from_folder(pixart)
    with pytest.raises(SamplingError) as err:
        adapter.generate(["a red fox"], seed=0, num_steps=2)
    assert isinstance(err.value, ConfigError) and isinstance(err.value.__cause__, ValueError)
    assert str(err.value.__cause__) == "Invalid sample size"
    edit_settings(pixart, use_resolution_binning=False)
    latents = DiffusersPipelineAdapter.from_folder(pixart).generate(["a red fox"], seed=0, num_steps=2)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_errors_of_the_model_are_not_rewritten(tmp_path, monkeypatch):
    """Only the pipeline's own checks become a SamplingError; an error inside the transformer stays."""
    adapter = DiffusersPipelineAdapter.from_folder(build_tiny_pipeline("dit", tmp_path / "dit"))

    def broken(*args, **kwargs):
        raise ValueError("inside the model")

    monkeypatch.setattr(adapter.transformer, "forward", broken)
    with pytest.raises(ValueError, match="inside the model"):
        adapter.generate([1], seed=0, num_steps=2)
