"""Shared fixtures: small recipes, tiny random reference DiTs, and quantized reference checkpoints.

Runs use one thread: several developers share two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import adatsq
from adatsq.checkpoint.save import QuantizedModel
from adatsq.models.diffusers.tiny import build_tiny_pipeline
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import DigitsPipeline, build_scheduler, build_transformer
from adatsq.recipe import Recipe, recipe_from_dict

torch.set_num_threads(1)

FAST_CALIBRATION = {"samples": 8, "steps": 4, "batch_size": 8, "seed": 0}


def _recipe(method: str = "gptq", bits: int = 4, act: int | None = 8, segments: int = 1, **extra) -> Recipe:
    return recipe_from_dict(
        {
            "method": method,
            "weight": {"bits": bits, "group_size": 32, "symmetric": False},
            "activation": {"bits": act},
            "calibration": {**FAST_CALIBRATION, "segments": segments},
            **extra,
        }
    )


@pytest.fixture(scope="session")
def make_recipe() -> Callable[..., Recipe]:
    """`make_recipe(method, bits, act, segments, **extra)`: group 32 asymmetric, 8 samples × 4 steps."""
    return _recipe


@pytest.fixture(scope="session")
def tiny_adapter() -> Callable[..., ReferenceAdapter]:
    """`tiny_adapter(layers=1, seed=0)`: a random reference-architecture DiT (2 heads), fresh each call."""

    def build(layers: int = 1, seed: int = 0) -> ReferenceAdapter:
        torch.manual_seed(seed)
        transformer = build_transformer({"num_layers": layers, "num_attention_heads": 2}).eval()
        return ReferenceAdapter(DigitsPipeline(transformer, build_scheduler()))

    return build


@pytest.fixture(scope="session")
def quantized_reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[QuantizedModel, Path]]:
    """`quantized_reference(method="gptq", bits=4)`: the shipped reference DiT quantized with
    `make_recipe(method, bits)` and saved; built once per session, then shared (treat it as read-only)."""
    built: dict[tuple[str, int], tuple[QuantizedModel, Path]] = {}

    def get(method: str = "gptq", bits: int = 4) -> tuple[QuantizedModel, Path]:
        if (method, bits) not in built:
            qmodel = adatsq.quantize("reference", _recipe(method, bits), progress=False)
            directory = tmp_path_factory.mktemp("ckpt") / f"{method}-w{bits}a8"
            qmodel.save(directory)
            built[method, bits] = (qmodel, directory)
        return built[method, bits]

    return get


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_pipeline_dir(family)`: folder of that family's tiny offline diffusers pipeline (saved once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_pipeline(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tree() -> Callable[[Path], dict[str, bytes | None]]:
    """`tree(root)`: every path under `root`, hidden ones too -> its bytes (None for folders)."""

    def read(root: Path) -> dict[str, bytes | None]:
        return {
            str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))
        }

    return read


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder nothing can be created in: mode 555, or for root (whom modes do not stop) the
    immutable flag; the test is skipped where neither works."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    immutable = os.access(folder, os.W_OK) and shutil.which("chattr") is not None
    if immutable and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        immutable = False
    if os.access(folder, os.W_OK):
        pytest.skip("cannot make a folder read-only here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)
