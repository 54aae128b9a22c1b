"""Every command that writes: a bad output path is one line and exit 2, and nothing changes on disk."""

from __future__ import annotations

import pytest

from adatsq.cli import main

RECIPE = """
method: adatsq
weight: {bits: 4, group_size: 32, symmetric: false}
activation: {bits: 8}
calibration: {samples: 8, steps: 4, batch_size: 8, segments: 2}
planner: {candidates: [3, 4, 8], fisher_samples: 2, measure_samples: 2, beam_width: 2}
"""


@pytest.fixture
def work(tmp_path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "file").write_text("keep")
    return tmp_path


def refused(capsys, args, fragment):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def quantize(work, out, *extra):
    return ["quantize", "reference", "--recipe", work / "recipe.yaml", "--out", out, *extra]


def test_quantize_refuses_bad_destinations(work, capsys, tree):
    before = tree(work)
    refused(capsys, quantize(work, work / "file", "--overwrite"), "is a file, not a folder")
    refused(capsys, quantize(work, work / "file" / "ckpt"), "file' is a file, not a folder")
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("keep")
    refused(capsys, quantize(work, work / "notes", "--overwrite"), "adatsq did not write")
    before["notes"], before["notes/todo.txt"] = None, b"keep"
    assert tree(work) == before


def test_quantize_under_a_read_only_folder(work, read_only_dir, capsys):
    refused(capsys, quantize(work, read_only_dir / "ckpt"), "is read-only")
    assert list(read_only_dir.iterdir()) == []


def test_a_failed_run_does_not_leave_the_missing_parent(work, capsys, tree):
    (work / "plan.json").write_text("{}")
    before = tree(work)
    out = work / "new" / "ckpt"
    assert main([str(a) for a in quantize(work, out, "--plan", work / "plan.json")]) == 2
    assert tree(work) == before


def test_plan_validates_the_whole_sweep_and_every_output_first(work, capsys, tree):
    args = ["plan", "reference", "--recipe", work / "recipe.yaml", "--out", work / "plan.json"]
    before = tree(work)
    refused(capsys, [*args, "--frontier", work / "frontier.json", "--sweep", "4,abc"], "'4,abc' must be")
    assert tree(work) == before
    (work / "plan.fisher.png").write_bytes(b"keep")
    refused(capsys, args, "plan.fisher.png' already exists")
    refused(capsys, [*args[:-1], work / "file" / "plan.json"], "is a file, not a folder")


def test_tokens_outputs_are_not_replaced_without_overwrite(work, capsys, tree):
    before = tree(work)
    refused(capsys, ["tokens", "bench", "--samples", "1", "--out", work / "file"], "--overwrite")
    refused(capsys, ["tokens", "show", "canvas:3", "--out", work / "file"], "--overwrite")
    refused(capsys, ["tokens", "show", "canvas:3", "--out", work / "file" / "m.png"], "is a file")
    assert tree(work) == before
