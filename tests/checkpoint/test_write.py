"""How a checkpoint is written: same bytes every run, the user's umask, nothing changed by a failure."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors import SafetensorError

from adatsq.checkpoint import shards
from adatsq.checkpoint.format import WEIGHTS
from adatsq.errors import OutputError


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
