"""Crash-safe outputs: umask modes, fsync order, stale temporaries, failures that change nothing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adatsq.core.io import atomic_write, atomic_write_text, check_output, output_folder, write_json
from adatsq.errors import OutputError


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(child.stdout)


class Boom(Exception):
    pass


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_get_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new" / "file.txt", "x")
        with output_folder(tmp_path / "out") as tmp:
            write_json(tmp / "config.json", {})
            (tmp / "sub").mkdir()
            (tmp / "sub" / "plain.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    for path in [tmp_path / "new", tmp_path / "out", tmp_path / "out" / "sub"]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for path in [tmp_path / "new" / "file.txt", tmp_path / "out" / "config.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1]
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1]
    )
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_name,) = [e[1] for e in events if e[0] == "replace"]
    assert events == [
        ("fsync", tmp_name),
        ("replace", tmp_name, str(tmp_path / "a.txt")),
        ("fsync", str(tmp_path)),
    ]

    events.clear()
    with output_folder(tmp_path / "out") as tmp:
        (tmp / "data.bin").write_bytes(b"1")  # written without fsync of its own
    moved = events.index(("replace", str(tmp), str(tmp_path / "out")))
    assert ("fsync", str(tmp / "data.bin")) in events[:moved] and ("fsync", str(tmp)) in events[:moved]
    assert events[moved + 1 :] == [("fsync", str(tmp_path))]


def test_stale_temporaries_are_removed_by_the_next_run(tmp_path):
    out, pid = tmp_path / "out", dead_pid()
    stale = [
        f".out.{pid}-0123abcd.partial",
        ".out.k3j_x9qa.partial",
        ".f.txt.q1w2e3r4.tmp",
        f".f.txt.{pid}-00ff00ff.tmp",
    ]
    live = f".out.{os.getpid()}-89abcdef.partial"  # a write in progress: kept
    for name in [*stale, live]:
        (tmp_path / name).mkdir()
    (tmp_path / ".out.calibration.safetensors").write_bytes(b"progress")  # not a temporary
    with output_folder(out) as tmp:
        left = {p.name for p in tmp_path.iterdir()} - {tmp.name}
        assert left == {
            live,
            ".f.txt.q1w2e3r4.tmp",
            f".f.txt.{pid}-00ff00ff.tmp",
            ".out.calibration.safetensors",
        }
        (tmp / "x").write_text("1")
    (tmp_path / ".out.old").mkdir()  # what a kill during the removal of the replaced folder leaves
    with output_folder(out, overwrite=True) as tmp:
        (tmp / "x").write_text("2")
    atomic_write_text(tmp_path / "f.txt", "x")
    assert {p.name for p in tmp_path.iterdir()} == {"out", "f.txt", live, ".out.calibration.safetensors"}
    assert (out / "x").read_text() == "2"


def test_a_failed_write_changes_nothing(tmp_path, tree):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("old")
    (tmp_path / "f.txt").write_text("old")
    before = tree(tmp_path)

    def fail(tmp):
        Path(tmp).write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(tmp_path / "f.txt", fail)
    with pytest.raises(Boom), output_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "x").write_text("half")
        raise Boom
    with pytest.raises(Boom), output_folder(tmp_path / "new" / "deeper" / "out") as tmp:
        raise Boom
    with pytest.raises(Boom):
        atomic_write(tmp_path / "new" / "f.txt", fail)
    assert tree(tmp_path) == before  # no temporaries, no half-created parents


def test_missing_parents_are_created_on_success(tmp_path):
    with output_folder(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "a" / "b" / "out" / "x").read_text() == "1"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what safetensors' save_file raises on a full disk
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_is_one_clear_error_and_changes_nothing(tmp_path, error, tree):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("old")
    (tmp_path / "f.txt").write_text("old")
    before = tree(tmp_path)

    def full(tmp):
        Path(tmp).write_text("half")
        raise error

    with pytest.raises(OutputError, match=r"no space left on the device while writing .*f\.txt"):
        atomic_write(tmp_path / "f.txt", full)
    with pytest.raises(OutputError, match="no space left"), output_folder(tmp_path / "out", True) as tmp:
        atomic_write(tmp / "x", full)
    with pytest.raises(OutputError, match="no space left"), output_folder(tmp_path / "n" / "out") as tmp:
        atomic_write(tmp / "x", full)
    assert tree(tmp_path) == before


def test_outputs_of_the_wrong_kind_are_refused_untouched(tmp_path, tree):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    before = tree(tmp_path)
    owned = lambda path: (path / "config.json").is_file()  # noqa: E731
    cases = [
        (lambda: output_folder(tmp_path / "file", overwrite=True).__enter__(), "is a file, not a folder"),
        (lambda: atomic_write_text(tmp_path / "folder", "x"), "is a folder, not a file"),
        (lambda: check_output(tmp_path / "theirs", True, folder=True, owned=owned), "did not write"),
        (lambda: output_folder(tmp_path / "file" / "out").__enter__(), "file' is a file, not a folder"),
        (lambda: atomic_write_text(tmp_path / "file" / "x" / "f.txt", "x"), "is a file, not a folder"),
        (lambda: check_output(tmp_path / "mine", False, folder=True, owned=owned), "pass --overwrite"),
    ]
    for call, fragment in cases:
        with pytest.raises(OutputError, match=fragment):
            call()
    check_output(tmp_path / "mine", True, folder=True, owned=owned)
    assert tree(tmp_path) == before


def test_a_read_only_folder_is_refused_before_writing(read_only_dir):
    for call in [
        lambda: atomic_write_text(read_only_dir / "f.txt", "x"),
        lambda: output_folder(read_only_dir / "out").__enter__(),
        lambda: output_folder(read_only_dir / "a" / "out").__enter__(),
    ]:
        with pytest.raises(OutputError, match="is read-only"):
            call()
    assert list(read_only_dir.iterdir()) == []


def test_a_permission_error_while_writing_is_one_clear_error(tmp_path, monkeypatch):
    """Where the early check cannot see it (e.g. network file systems), the write's own error."""
    monkeypatch.setattr(os, "access", lambda *a, **k: True)

    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", tmp)

    with pytest.raises(OutputError, match=r"cannot write .*Permission denied"):
        atomic_write(tmp_path / "f.txt", denied)
    assert list(tmp_path.iterdir()) == []
