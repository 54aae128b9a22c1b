"""tools/bench_kernels.py: the interleaved timer, a small shape end to end, and the partial report."""

import json

import bench_kernels as bench
import torch

from adatsq.quant.kernels import onednn


def test_time_methods_interleaves_and_times_slow_methods_once():
    x = torch.randn(8, 16)
    calls = []

    def method(name, cost):
        def run(t):
            calls.append(name)
            return t * cost

        return run, 0, "fp32"

    methods = {"bf16": method("bf16", 1.0), "fast": method("fast", 1.0)}
    times, once, err = bench.time_methods(methods, {"fp32": x}, x, reps=2, warm=True)
    assert calls == ["bf16", "fast"] * 3  # a warm-up round, then two timed rounds, interleaved
    assert [len(times[n]) for n in methods] == [2, 2] and not once and err == {"bf16": 0.0, "fast": 0.0}


def test_one_small_shape_writes_an_honest_partial_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", (("tiny 64->128", 64, 128),))
    monkeypatch.setattr(bench, "peer_methods", lambda lin, gs: ({}, {"peers": "skipped in tests"}))
    assert bench.main(["--tokens", "8", "1024", "--skip-e2e", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    row = report["layers"][0]["tokens"]["1024"]
    assert row["ms"]["ours W8A8"] > 0 and row["vs_bf16"]["bf16"] == 1.0 and "ms_median" in row
    cached = "int8-onednn" if onednn.available() else "int8-cached"
    assert report["layers"][0]["kernels"]["ours W8A8"] == cached
    assert report["partial"] is False and report["machine"]["torch_threads"] == 1
    markdown = (tmp_path / "kernels.md").read_text()
    assert "PARTIAL" not in markdown and f"| ours W8A8 | {cached} |" in markdown
    report["partial"], report["done"] = True, ["tiny 64->128"]
    (tmp_path / "partial.json").write_text(json.dumps(report))
    assert bench.main(["--from-json", str(tmp_path / "partial.json"), "--out", str(tmp_path)]) == 0
    assert "**PARTIAL REPORT**" in (tmp_path / "kernels.md").read_text()
