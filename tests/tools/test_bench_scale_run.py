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
    subprocess.run([*cmd, "--out", str(tmp_path)], check=True, capture_output=True, timeout=2400)
    report = json.loads((tmp_path / "scale_run.json").read_text())
    assert list(report["methods"]) == ["gptq", "adatsq"]
    for method, result in report["methods"].items():
        runs = result["depths"][0]["runs"]
        assert [r["budget_bytes"] is None for r in runs] == [True, False, False], method
        assert all(r["passes"] > 1 for r in runs[1:]), method  # the budgets really split calibration
        assert result["identical_across_budgets"] and result["identical_across_processes"], method
        ratios = [r["ratio"] for r in runs] + [result["torchrun"]["ratio"]]
        assert all(0.75 <= x <= 1.25 for x in ratios), (method, ratios)
        assert result["load"]["rss_bytes"] > 0
    assert "plan.json" in report["methods"]["adatsq"]["depths"][0]["runs"][0]["sha256"]
    assert (tmp_path / "scale_run.md").read_text().startswith("# Scale, measured")
