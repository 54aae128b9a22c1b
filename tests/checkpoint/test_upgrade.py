"""Format-1 checkpoints (written by adatsq before format 2) still load; `adatsq upgrade` rewrites them.

data/flux-gptq-format1 is the tiny Flux pipeline quantized with GPTQ W4A8 by commit ffcccdb, the last
version writing format 1 (adatsq_config.json + model.safetensors + base/).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

import adatsq
from adatsq.checkpoint.shards import write_tensors
from adatsq.cli import main

FORMAT1 = Path(__file__).parent / "data" / "flux-gptq-format1"
CALL = {"prompt": ["a red fox"], "height": 16, "width": 16, "num_inference_steps": 4}
CALL["max_sequence_length"] = 8


def sample(pipe) -> torch.Tensor:
    return pipe(**CALL, output_type="pt", generator=torch.Generator().manual_seed(3)).images


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def old(tmp_path) -> Path:
    return Path(shutil.copytree(FORMAT1, tmp_path / "old"))


def test_a_format1_checkpoint_loads_and_upgrades_to_the_same_model(old, capsys):
    before = sample(adatsq.load(old))
    weights = sha(old / "model.safetensors")
    assert main(["upgrade", str(old)]) == 0
    assert "format 1 -> 2; the denoiser is transformer/" in capsys.readouterr().out
    assert not (old / "adatsq_config.json").exists() and not (old / "base").exists()
    assert sha(old / "transformer" / "diffusion_pytorch_model.safetensors") == weights  # bytes unchanged
    config = json.loads((old / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert config["quantization_config"]["format_version"] == 2
    assert (old / "report.json").is_file() and (old / "adatsq_pipeline.json").is_file()
    assert torch.equal(sample(adatsq.load(old)), before)
    adatsq.register_with_diffusers()
    assert torch.equal(sample(diffusers.DiffusionPipeline.from_pretrained(old)), before)
    assert main(["upgrade", str(old)]) == 0  # already current: nothing is rewritten
    assert "already format 2: nothing to do" in capsys.readouterr().out


def test_a_sharded_format1_checkpoint_upgrades(old):
    tensors = load_file(str(old / "model.safetensors"))
    (old / "model.safetensors").unlink()
    write_tensors(old, tensors, 60_000)  # format 1's shards: model-0000k-of-0000n + the index
    before = sample(adatsq.load(old))
    assert main(["upgrade", str(old)]) == 0
    shards = sorted(p.name for p in (old / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert (
        len(shards) > 1 and (old / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    )
    assert not list(old.glob("model-*.safetensors"))
    assert torch.equal(sample(adatsq.load(old)), before)  # the index's shard hashes were checked
    assert torch.equal(sample(diffusers.DiffusionPipeline.from_pretrained(old)), before)


def break_config(d: Path) -> None:
    (d / "adatsq_config.json").write_text("{not json")


def break_base(d: Path) -> None:
    (d / "base" / "model_index.json").unlink()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (None, "not found"),
        (lambda d: shutil.rmtree(d), "not found"),
        (lambda d: (d / "adatsq_config.json").unlink(), "is not an adatsq checkpoint"),
        (break_config, "invalid JSON"),
        (break_base, "does not rebuild"),
    ],
    ids=["missing-argument-folder", "missing-folder", "not-a-checkpoint", "bad-config", "broken-base"],
)
def test_bad_input_is_one_line_and_exit_2(old, tree, capsys, mutate, fragment):
    target = old.parent / "nowhere" if mutate is None else old
    if mutate is not None:
        mutate(old)
    listing = tree(old.parent)
    assert main(["upgrade", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adatsq: error: ") and fragment in err[0], err
    assert tree(old.parent) == listing  # nothing was written or removed
