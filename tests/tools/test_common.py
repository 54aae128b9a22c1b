"""tools/bench/common.py: the thread policy, Markdown cells and the report files every benchmark writes."""

import json
from unittest import mock

import pytest
from bench import common


@pytest.mark.parametrize(
    ("requested", "load", "expected"),
    [
        (3, 9.0, (3, "--threads")),
        (None, 1.99, (1, "machine shared (load 1.99)")),
        (None, 0.2, (8, "machine idle (load 0.20)")),
    ],
)
def test_thread_policy(requested, load, expected):
    with (
        mock.patch.object(common.os, "getloadavg", return_value=(load, 0, 0)),
        mock.patch.object(common.os, "cpu_count", return_value=8),
    ):
        assert common.pick_threads(requested) == expected


def test_cells_and_the_pass_fail_marker():
    assert [common.fmt(x) for x in (None, True, False, 1.0 / 3, float("inf"), 7)] == [
        "–", "yes", "**no**", "0.33", "inf", "7"
    ]  # fmt: skip
    assert common.fmt(0.123456, ".3f") == "0.123"
    assert (common.verdict(True), common.verdict(False)) == ("pass", "**FAIL**")
    targets = [
        {"target": "a ≥ 1", "measured": "2", "pass": True},
        {"target": "b", "measured": "0", "pass": False},
    ]
    assert common.targets_table(targets) == [
        "| target | measured | result |",
        "|---|---|---|",
        "| a ≥ 1 | 2 | pass |",
        "| b | 0 | **FAIL** |",
    ]
    assert common.table(["x", "ok"], [["row", False], [0.5, None]]) == [
        "| x | ok |", "|---|---|", "| row | **no** |", "| 0.50 | – |"
    ]  # fmt: skip


def test_machine_line():
    info = {"cpu_model": "AMD EPYC", "torch_threads": 1, "python": "3.11.7"}
    assert common.machine_line(info) == "AMD EPYC, torch threads=1, Python 3.11.7"


def test_report_files_are_written_whole(tmp_path):
    json_path, md_path = common.write_report(tmp_path / "r", "x", {"a": 1.5, "b": [1, 2]}, "# x\n")
    assert json.loads(json_path.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert md_path.read_text() == "# x\n"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["x.json", "x.md"]  # no temporary left
    assert common.read_report(json_path) == {"a": 1.5, "b": [1, 2]}
