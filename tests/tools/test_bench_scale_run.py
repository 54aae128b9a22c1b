"""tools/bench_scale_run.py --quick: real quantize processes, measured RSS beside the prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_is_byte_identical_and_within_a_quarter_of_the_prediction(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_scale_run.py"), "--quick", "--depths", "1"]
    subprocess.run([*cmd, "--out", str(tmp_path)], check=True, capture_output=True, timeout=1200)
    report = json.loads((tmp_path / "scale_run.json").read_text())
    runs = report["depths"][0]["runs"]
    assert [r["budget_bytes"] is None for r in runs] == [True, False, False]
    assert all(r["passes"] > 1 for r in runs[1:])  # the budgets really split calibration
    assert report["identical_across_budgets"] and report["identical_across_processes"]
    assert all(0.75 <= r["ratio"] <= 1.25 for r in runs), [r["ratio"] for r in runs]
    assert (tmp_path / "scale_run.md").read_text().startswith("# Scale, measured")
