"""Atomic writes: a crash or Ctrl-C never leaves a half-written checkpoint, plan, plot or asset.

Files go through a temporary sibling renamed onto the target; folders are built in a temporary sibling
folder and moved into place at the end; existing outputs are never replaced without `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adatsq.errors import ConfigError


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file in the same folder, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shipped files unreadable to others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def check_output(path: Path, overwrite: bool) -> None:
    """Existing outputs are never clobbered without `overwrite` (checked before any long work)."""
    if path.exists() and not overwrite:
        raise ConfigError(f"output {str(path)!r} already exists; pass --overwrite to replace it")


def prepare_output(directory: Path, overwrite: bool) -> Path:
    """Refuse to clobber without `overwrite`; return an empty temporary sibling folder to write into."""
    check_output(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".partial"))


def commit_output(tmp: Path, directory: Path) -> None:
    """Move a finished temporary folder into place, replacing an old one only after success."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
