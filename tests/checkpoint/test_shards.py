"""Sharded checkpoints: diffusers' naming and index, the same model as one file, broken sets refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

import adatsq
from adatsq.checkpoint.inspect import inspect_checkpoint
from adatsq.checkpoint.load import load_checkpoint
from adatsq.checkpoint.shards import TensorFiles
from adatsq.errors import CheckpointError

# format 2: the reference DiT is the transformer/ component, its files named as diffusers names them
STEM = "diffusion_pytorch_model"
INDEX = f"{STEM}.safetensors.index.json"


def rtn_recipe(seed: int = 0):
    r = adatsq.load_recipe("recipes/reference/rtn-w4a8.yaml")
    return replace(r, calibration=replace(r.calibration, samples=4, steps=4, batch_size=4, seed=seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    qmodel = adatsq.quantize("reference", rtn_recipe(), progress=False)
    qmodel.save(root / "one")
    qmodel.save(root / "many", max_shard_size="200KB")
    return root / "one" / "transformer", root / "many" / "transformer"


def test_large_checkpoints_are_split_with_an_index(folders):
    one, many = folders
    index = json.loads((many / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == f"{STEM}-00001-of-{len(shards):05d}.safetensors"
    assert not (many / f"{STEM}.safetensors").exists() and not (one / INDEX).exists()
    assert all((many / s).stat().st_size <= 200_000 + 100_000 for s in shards)  # one big tensor may exceed
    assert sorted(index["weight_map"]) == sorted(TensorFiles(one).keys())
    report = json.loads((many.parent / "report.json").read_text())
    assert report["checkpoint_bytes"] == index["metadata"]["total_size"] == TensorFiles(many).nbytes()


def test_shards_load_into_the_same_model(folders):
    one, many = folders
    labels = [1, 7]
    a = load_checkpoint(one.parent)[0].generate(labels, seed=3, num_steps=4)
    b = load_checkpoint(many.parent)[0].generate(labels, seed=3, num_steps=4)
    assert torch.equal(a, b)
    assert inspect_checkpoint(one.parent).splitlines()[-1] == inspect_checkpoint(many.parent).splitlines()[-1]


def test_a_missing_shard_is_named(folders, tmp_path):
    broken = shutil.copytree(folders[1].parent, tmp_path / "broken")
    count = len(list(broken.glob(f"transformer/{STEM}-*")))
    (broken / "transformer" / f"{STEM}-00002-of-{count:05d}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"shard .*{STEM}-00002-of-.* is missing"):
        load_checkpoint(broken)


def test_a_shard_from_another_run_is_refused(folders, tmp_path):
    """Same model, same layout, other values (symmetric grid): only the index's sha256 tells them apart."""
    other = tmp_path / "other"
    symmetric = replace(rtn_recipe(), weight=replace(rtn_recipe().weight, symmetric=True))
    adatsq.quantize("reference", symmetric, progress=False).save(other, max_shard_size="200KB")
    mixed = shutil.copytree(folders[1].parent, tmp_path / "mixed")
    index = json.loads((mixed / "transformer" / INDEX).read_text())
    name = index["weight_map"]["transformer_blocks.0.attn1.to_q.w4.qweight"]
    shutil.copy(other / "transformer" / name, mixed / "transformer" / name)
    with pytest.raises(CheckpointError, match=f"{name} does not belong to this checkpoint"):
        load_checkpoint(mixed)
    load_checkpoint(mixed, verify=False)  # the check is what refused it, not a broken file
