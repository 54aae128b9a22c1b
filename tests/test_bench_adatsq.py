"""tools/bench_adatsq.py end to end on a 1-block random DiT (4 steps, 2 segments): files and invariants."""

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~20 s of CPU (a minute of wall time on the shared machine)


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_adatsq", ROOT / "tools" / "bench_adatsq.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    tool = load_tool()
    argv = [
        "--tiny",
        "--threads",
        "1",
        "--frontier-budgets",
        "3.5,4,6",
        "--out",
        str(out),
        "--work",
        str(out / "w"),
    ]
    return tool, tool.main(argv), out


def test_every_method_and_setting_is_measured(run):
    tool, report, _ = run
    for setting in tool.SETTINGS:
        rows = report["table"][setting.name]
        assert list(rows) == [*tool.UNIFORM, *tool.MIXED]
        for method, row in rows.items():
            assert math.isfinite(row["psnr_db"]) and row["checkpoint_bytes"] > 0, (setting, method)
            if method in tool.UNIFORM:
                assert row["avg_bits"] == setting.weight_bits
            else:
                assert row["avg_bits"] <= setting.weight_bits + 1e-9
                assert row["checkpoint_avg_bits"] == pytest.approx(row["avg_bits"])
    # A4: the bit-allocation methods share the shipped outlier handling, the RTN baselines run plain
    a4 = report["table"]["W4A4"]
    assert a4["rtn"]["outliers"]["rotate"] is False and a4["smoothquant"]["outliers"]["smooth_alpha"] == 0.5
    assert all(a4[m]["outliers"]["rotate"] for m in ("gptq", "static", "adatsq"))


def test_frontier_overhead_and_files(run):
    _, report, out = run
    frontier = report["frontier"]
    assert [p["budget"] for p in frontier["points"]] == [3.5, 4.0, 6.0]
    errors = [p["measured_error"] for p in frontier["points"]]
    assert frontier["monotone"] == all(a > b for a, b in itertools.pairwise(errors))
    assert report["overhead"]["twins_identical_output"] is True
    assert len(report["targets"]) == 7
    saved = json.loads((out / "adatsq.json").read_text())
    assert saved["table"]["W4A8"]["adatsq"]["psnr_db"] == report["table"]["W4A8"]["adatsq"]["psnr_db"]
    assert "## Targets" in (out / "adatsq.md").read_text()
    for name in ("adatsq_frontier.png", "adatsq_fisher.png", "adatsq_plan_w4a8.png", "adatsq_frontier.json"):
        assert (out / name).stat().st_size > 0
    assert not (out / "w").exists()  # checkpoints are removed unless --keep-work
