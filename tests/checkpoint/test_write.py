"""How a checkpoint is written: same bytes every run, the user's umask, nothing changed by a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import adatsq
from adatsq.checkpoint import shards
from adatsq.errors import OutputError

WRITE = """
import hashlib, sys
from pathlib import Path
sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
import torch
from adatsq.checkpoint.shards import write_tensors
g = torch.Generator().manual_seed(0)
tensors = {f"block.{i}.{kind}": torch.randn(64, 32, generator=g).to(dtype)
           for i in range(6) for kind, dtype in [("weight", torch.float16), ("bias", torch.float32)]}
tensors["qweight"] = torch.randint(0, 255, (128, 16), generator=g, dtype=torch.uint8)
for run in range(4):
    for max_bytes in (1 << 30, 16_000):
        out = Path(sys.argv[1], f"{run}-{max_bytes}")
        out.mkdir()
        write_tensors(out, tensors, max_bytes)
        print(" ".join(f"{p.name}:{sha(p)}" for p in sorted(out.glob("*"))))
"""


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"  # format 2: the reference DiT's component


def test_tensor_files_are_byte_identical_across_runs(tmp_path):
    """safetensors orders `__metadata__` at random per call and per process: only one key keeps it fixed."""
    lines = set()
    for seed in ("0", "1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        (tmp_path / seed).mkdir()
        command = [sys.executable, "-c", WRITE, str(tmp_path / seed)]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        lines.update(run.stdout.splitlines())
    assert len(lines) == 2  # one single-file layout, one sharded layout
    assert any("model-00001-of-" in line and "model.safetensors.index.json" in line for line in lines)


def test_checkpoints_with_the_older_metadata_still_load(quantized_reference, tmp_path):
    qmodel, directory = quantized_reference("gptq", 4)
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    tensors = load_file(old / WEIGHTS)
    save_file(tensors, str(old / WEIGHTS), metadata={"format": "pt", "adatsq": "1"})  # before the change
    pipe = adatsq.load(old)
    assert len(qmodel.layers) and pipe.transformer is not None


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_and_folders_get_the_umask(quantized_reference, tmp_path, umask):
    qmodel, _ = quantized_reference("gptq", 4)
    old = os.umask(umask)
    try:
        qmodel.save(tmp_path / "ckpt")
    finally:
        os.umask(old)
    paths = [tmp_path / "ckpt", *(tmp_path / "ckpt").rglob("*")]
    modes = {p.stat().st_mode & 0o777 for p in paths if p.is_dir()}
    assert modes == {0o777 & ~umask}
    modes = {p.stat().st_mode & 0o777 for p in paths if p.is_file()}
    assert modes == {0o666 & ~umask} and (tmp_path / "ckpt" / WEIGHTS).is_file()


def tree(root):
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


def test_a_full_disk_keeps_the_old_checkpoint(quantized_reference, tmp_path, monkeypatch, tree):
    qmodel, directory = quantized_reference("gptq", 4)
    shutil.copytree(directory, tmp_path / "ckpt")
    before = tree(tmp_path)

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(shards, "save_file", full)
    with pytest.raises(OutputError, match="no space left on the device while writing"):
        qmodel.save(tmp_path / "ckpt", overwrite=True)
    with pytest.raises(OutputError, match="no space left"):
        qmodel.save(tmp_path / "new" / "ckpt")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_checkpoint_folders(quantized_reference, tmp_path, tree):
    qmodel, _ = quantized_reference("gptq", 4)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="folder adatsq did not write"):
        qmodel.save(tmp_path / "notes", overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        qmodel.save(tmp_path / "file", overwrite=True)
    assert tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    qmodel.save(tmp_path / "empty", overwrite=True)
    assert json.loads((tmp_path / "empty" / "report.json").read_text())["checkpoint_bytes"] > 0
