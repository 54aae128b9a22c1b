"""`adatsq tokens show | bench` on the shipped reference UMM: outputs and bad input (exit code 2)."""

import subprocess
import sys

import numpy as np

from adatsq.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "adatsq.cli", *args], capture_output=True, text=True)


def test_show_draws_the_kept_tokens(tmp_path, capsys):
    out = tmp_path / "map.png"
    assert main(["tokens", "show", "canvas:3", "--method", "g2tr", "--keep", "0.5", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_show_refuses_wrong_image_size_and_bad_keep(tmp_path):
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((32, 32), dtype=np.float32))
    for args, fragment in [
        ((str(small), "--keep", "0.5"), "48x48"),
        (("canvas:1", "--keep", "1.5"), "outside (0, 1]"),
        (("canvas:x",), "canvas:SEED"),
    ]:
        result = run_cli("tokens", "show", *args, "--out", str(tmp_path / "m.png"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert fragment in result.stderr


def test_bench_refuses_bad_keep_and_non_umm_checkpoints(tmp_path):
    result = run_cli("tokens", "bench", "--keep", "0,0.5")
    assert result.returncode == 2 and "outside (0, 1]" in result.stderr
