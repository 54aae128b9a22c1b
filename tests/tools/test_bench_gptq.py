"""tools/bench_gptq.py --quick: every method in its own process on one small layer, the report's keys."""

import json

import bench_gptq as bench
import pytest
from bench.gptq_solve import METHODS


def test_quick_run_writes_the_report(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gptq_solve.json").read_text())
    assert report["quick"] and report["repeats"] == 1 and report["machine"]["torch_threads"] == bench.THREADS
    assert {"load_average_at_start", "cpu_model"} <= set(report["machine"])
    assert {"torch", "numpy", "git_commit"} <= set(report["versions"]) and report["load_average_at_end"]
    assert [c["scheme"] for c in report["cases"]] == list(bench.SCHEMES)
    for case in report["cases"]:
        ours = case["methods"]["adatsq"]
        assert set(case["methods"]) == set(METHODS)
        for row in case["methods"].values():
            assert len(row["seconds"]) == 1 and row["seconds_median"] > 0 and row["peak_rss_bytes_max"] >= 0
        assert ours["loss"] == pytest.approx(ours["objective"], rel=1e-6)  # its reported loss, checked
        assert case["methods"]["adatsq_overwrite_h"]["objective"] == ours["objective"]
        assert set(case["objective_ratio"]) == set(case["time_ratio"]) == set(bench.REFERENCES)
        assert all(r == pytest.approx(1, abs=0.01) for r in case["objective_ratio"].values())
    assert len(report["targets"]) == 4 and all(isinstance(t["pass"], bool) for t in report["targets"])
    markdown = (tmp_path / "gptq_solve.md").read_text()
    assert markdown.startswith("# GPTQ solve benchmark")
    (tmp_path / "gptq_solve.md").unlink()
    assert bench.main(["--from-json", str(tmp_path / "gptq_solve.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "gptq_solve.md").read_text() == markdown
