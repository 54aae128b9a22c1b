"""`--link-components`: the pipeline's other components are hard links to the source's files, not copies.

A FLUX.1-dev checkpoint otherwise writes T5-XXL, CLIP and the VAE (~9.5 GB) again beside a quantized
transformer of a few GB.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import diffusers
import pytest
import torch

import adatsq
from adatsq.cli import main
from adatsq.core import io
from adatsq.errors import ConfigError
from adatsq.recipe import recipe_from_dict

RTN = {"method": "rtn", "weight": {"bits": 4, "group_size": 16, "symmetric": False}}
RECIPE = "method: rtn\nweight: {bits: 4, group_size: 16, symmetric: false}\n"


def component_files(folder: Path) -> dict[str, Path]:
    """Files of every component but the transformer, by path relative to the pipeline folder."""
    return {
        str(p.relative_to(folder)): p
        for p in folder.rglob("*")
        if p.is_file()
        and p.relative_to(folder).parts[0] != "transformer"
        and len(p.relative_to(folder).parts) > 1
    }


@pytest.fixture(scope="module")
def flux(tiny_pipeline_dir) -> Path:
    return tiny_pipeline_dir("flux")


@pytest.fixture(scope="module")
def saved(flux, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Flux pipeline quantized once and saved twice: components written, components linked."""
    qmodel = adatsq.quantize(str(flux), recipe_from_dict(RTN), progress=False)
    root = tmp_path_factory.mktemp("link")
    return qmodel.save(root / "written"), qmodel.save(root / "linked", link_components=True)


def test_linked_components_are_the_source_files_themselves(flux, saved):
    _, linked = saved
    source, ours = component_files(flux), component_files(linked)
    assert ours.keys() == source.keys() and any(name.startswith("text_encoder/") for name in ours)
    for name, path in ours.items():
        assert not path.is_symlink() and path.stat().st_ino == source[name].stat().st_ino, name
    weights = [p for p in ours.values() if p.suffix == ".safetensors"]
    assert weights and all(p.stat().st_nlink >= 2 for p in weights)  # one copy of the bytes on disk


def test_a_linked_checkpoint_loads_and_samples_like_a_written_one(saved):
    written, linked = saved
    adatsq.register_with_diffusers()
    outputs = []
    for folder in (written, linked):
        for pipe in (adatsq.load(folder), diffusers.DiffusionPipeline.from_pretrained(folder)):
            pipe.set_progress_bar_config(disable=True)
            out = pipe(prompt=["a red fox"], num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(3), height=32, width=32)  # fmt: skip
            outputs.append(out.images)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_overwriting_a_linked_checkpoint_leaves_the_source_untouched(flux, saved, tmp_path):
    before = {name: path.read_bytes() for name, path in component_files(flux).items()}
    qmodel = adatsq.quantize(str(flux), recipe_from_dict(RTN), progress=False)
    out = qmodel.save(tmp_path / "q", link_components=True)
    qmodel.save(out, overwrite=True, link_components=True)
    qmodel.save(out, overwrite=True)  # written copies replace the links: the source keeps its bytes
    assert {name: path.read_bytes() for name, path in component_files(flux).items()} == before
    assert all(p.stat().st_nlink == 1 for p in component_files(out).values())


def test_another_filesystem_gets_symlinks_and_a_warning(flux, tmp_path, monkeypatch, caplog):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(io.os, "link", cross_device)  # what os.link does across filesystems
    linked, symlinked = io.link_tree(flux / "vae", tmp_path / "vae")
    assert linked == 0 and symlinked == len(list((flux / "vae").rglob("*.*")))
    for path in (tmp_path / "vae").rglob("*"):
        if path.is_file():
            assert path.is_symlink() and path.resolve() == (flux / "vae" / path.name).resolve()
    assert "symlinked, not hard-linked" in caplog.text


def test_a_model_without_component_folders_is_refused_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "q"
    assert (
        main(["quantize", "reference", "--recipe", str(recipe), "--out", str(out), "--link-components"]) == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and "--link-components needs a model loaded from a local diffusers pipeline" in lines[0]
    )
    assert "drop the flag" in lines[0] and not out.exists()


def test_the_python_api_refuses_too(quantized_reference, tmp_path):
    qmodel, _ = quantized_reference("rtn")
    with pytest.raises(ConfigError, match="--link-components needs"):
        qmodel.save(tmp_path / "q", link_components=True)
    assert not (tmp_path / "q").exists()


def test_a_hub_cache_snapshot_links_the_blobs_not_the_symlinks(flux, tmp_path):
    """huggingface_hub snapshots are relative symlinks into blobs/: a link of the symlink would dangle."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc" / "vae"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in (flux / "vae").iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blobs / path.name, snapshot))
    linked, symlinked = io.link_tree(snapshot, tmp_path / "out")
    assert (linked, symlinked) == (len(list(blobs.iterdir())), 0)
    for path in (tmp_path / "out").iterdir():
        assert not path.is_symlink() and path.stat().st_ino == (blobs / path.name).stat().st_ino
