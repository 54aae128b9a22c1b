"""`torchrun --nproc-per-node 2 adatsq quantize`: gloo owner ranks, rank 0 writes the one-process bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """\
method: gptq
weight: {bits: 4, group_size: 64, symmetric: false}
activation: {bits: 8}
targets: ['.*']
ignore: []
calibration: {samples: 6, steps: 4, batch_size: 3, seed: 0, segments: 2}
gptq: {damping: 0.01, act_order: true, block_size: 128}
"""


def adatsq(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cli = shutil.which("adatsq", path=str(Path(sys.executable).parent)) or "adatsq"
    return subprocess.run([*launcher, cli, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun"
)
def test_torchrun_two_processes_write_what_one_process_writes(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(RECIPE)
    common = ("quantize", "reference", "--recipe", str(recipe))
    one = adatsq(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2")
    two = adatsq(*common, "--out", str(tmp_path / "two"), "--devices", "2", launcher=torchrun)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 alone writes and reports
    config = "transformer/config.json"  # format 2: the reference DiT's component
    assert (tmp_path / "one" / config).read_bytes() == (tmp_path / "two" / config).read_bytes()
    a, b = (tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors" for d in ("one", "two"))
    assert a.read_bytes() == b.read_bytes()  # header included: byte for byte


def test_devices_that_do_not_match_the_launch_are_one_line(tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(RECIPE)
    run = adatsq(
        "quantize", "reference", "--recipe", str(recipe), "--out", str(tmp_path / "q"), "--devices", "2"
    )
    assert run.returncode == 2 and "does not match the 1 process(es)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
