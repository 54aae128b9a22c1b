"""tools/bench_adatsq.py: the frontier checks and targets on constructed frontiers (fast), and the
whole benchmark end to end on a 1-block random DiT (4 steps, 2 segments; slow)."""

import json
import math
from types import SimpleNamespace

import bench_adatsq as tool
import pytest
from bench.common import targets_table

OVERHEAD = {
    "cpu": {"overhead_of_medians": 0.01, "median_paired_overhead": 0.005},
    "wall": {"overhead_of_medians": 0.0},
}


def result(avg_bits: float, error: float) -> SimpleNamespace:
    """What the summary reads of a planner SearchResult."""
    metrics = {"avg_bits": avg_bits, "measured_error": error, "proxy_error": 2 * error}
    return SimpleNamespace(metrics=metrics, search_seconds=1.0, measure_calls=3)


def summary(beam, static=(), uniform=(), kept=None):
    beam = [result(*p) for p in beam]
    return tool.frontier_summary(
        [p.metrics["avg_bits"] for p in beam],
        beam,
        [result(*p) for p in static],
        [result(*p) for p in uniform],
        kept=len(beam) if kept is None else kept,
    )


def frontier_rows(frontier) -> list[str]:
    """The two frontier rows of the report's targets table."""
    return targets_table(tool.targets({}, frontier, OVERHEAD))[2:4]


def test_a_monotone_undominated_frontier_passes():
    frontier = summary([(3.5, 0.30), (4.0, 0.20), (6.0, 0.10)], static=[(3.5, 0.40)], uniform=[(8.0, 0.05)])
    assert frontier["monotone"] is True
    assert frontier["dominated_by_baselines"] == []
    assert frontier_rows(frontier) == [
        "| A8 frontier (3 budgets) monotone | 3.50→0.3, 4.00→0.2, 6.00→0.1 | pass |",
        "| A8 frontier non-dominated (all points kept, none beaten by a static/uniform plan) "
        "| 3/3 kept, 0 dominated by baselines | pass |",
    ]


def test_an_error_that_rises_with_the_budget_is_reported_as_not_monotone():
    frontier = summary([(3.5, 0.30), (4.0, 0.35), (6.0, 0.10)])
    assert frontier["monotone"] is False
    assert frontier_rows(frontier)[0] == (
        "| A8 frontier (3 budgets) monotone | 3.50→0.3, 4.00→0.35, 6.00→0.1 | **FAIL** |"
    )


def test_equal_costs_are_not_monotone():
    assert summary([(4.0, 0.30), (4.0, 0.20)])["monotone"] is False


def test_a_point_beaten_by_a_cheaper_static_plan_is_reported_as_dominated():
    frontier = summary([(3.5, 0.30), (4.0, 0.20), (6.0, 0.10)], static=[(3.9, 0.15)], uniform=[(8.0, 0.05)])
    assert frontier["monotone"] is True
    assert frontier["dominated_by_baselines"] == [{"budget": 4.0, "by": "static", "cost": 3.9, "error": 0.15}]
    assert frontier["non_dominated"] is False
    assert frontier_rows(frontier)[1].endswith("| 3/3 kept, 1 dominated by baselines | **FAIL** |")


def test_a_point_dropped_by_the_pareto_filter_fails_non_dominated():
    frontier = summary([(3.5, 0.30), (4.0, 0.20)], kept=1)
    assert frontier["dominated_by_baselines"] == [] and frontier["non_dominated"] is False
    assert frontier_rows(frontier)[1].endswith("| 1/2 kept, 0 dominated by baselines | **FAIL** |")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--threads", "1", "--frontier-budgets", "3.5,4,6", "--out", str(out)]
    return tool.main([*argv, "--work", str(out / "w")]), out


@pytest.mark.slow  # ~20 s of CPU (a minute of wall time on the shared machine)
def test_every_method_and_setting_is_measured(run):
    report, _ = run
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


@pytest.mark.slow
def test_frontier_overhead_and_files(run, tmp_path):
    report, out = run
    assert [p["budget"] for p in report["frontier"]["points"]] == [3.5, 4.0, 6.0]
    assert report["overhead"]["twins_identical_output"] is True
    assert len(report["targets"]) == 7
    saved = json.loads((out / "adatsq.json").read_text())
    assert saved["table"]["W4A8"]["adatsq"]["psnr_db"] == report["table"]["W4A8"]["adatsq"]["psnr_db"]
    markdown = (out / "adatsq.md").read_text()
    assert "## Targets" in markdown
    for name in ("adatsq_frontier.png", "adatsq_fisher.png", "adatsq_plan_w4a8.png", "adatsq_frontier.json"):
        assert (out / name).stat().st_size > 0
    assert not (out / "w").exists()  # checkpoints are removed unless --keep-work
    tool.main(["--from-json", str(out / "adatsq.json"), "--out", str(tmp_path)])
    assert (tmp_path / "adatsq.md").read_text() == markdown
