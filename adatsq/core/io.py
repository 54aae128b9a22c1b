"""Crash-safe outputs: a crash, Ctrl-C or full disk never leaves a half-written or half-replaced output.

A file is written to a temporary sibling, fsynced, renamed onto its target, and the folder holding it is
fsynced; a folder is built in a temporary sibling folder, fsynced file by file and renamed into place the
same way. Temporaries are named `.NAME.<pid>-<random>.tmp|partial`: those whose process is gone (a killed
run) are removed by the next write of the same output. Missing parent folders are created for the write
and removed again if it fails. An existing output is never replaced without `overwrite`, a file never by
a folder nor the other way round. Everything gets the user's umask, like any other file they create.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adatsq.errors import OutputError

log = logging.getLogger(__name__)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
# what follows ".NAME." in a temporary: ours, or a mkstemp / mkdtemp one from before pids were in names
_TEMP = re.compile(r"(?:(\d+)-[0-9a-f]{8}|[a-z0-9_]{8})\.(?:tmp|partial)")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust core reports an I/O failure
_IN_TEMPORARY = re.compile(r"\.([^/\\]+)\.\d+-[0-9a-f]{8}\.partial")


def check_output(
    path: str | os.PathLike[str],
    overwrite: bool,
    folder: bool = False,
    owned: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse, before any long work, an output that cannot or may not be written.

    `owned(path)` says whether an existing non-empty folder is one this program wrote: --overwrite
    replaces only those, never e.g. a home folder given by mistake.
    """
    path = Path(path)
    _check_parents(path)
    if not path.exists():
        return
    kind, wanted = ("folder" if path.is_dir() else "file"), ("folder" if folder else "file")
    if kind != wanted:
        raise OutputError(
            f"output {str(path)!r} is a {kind}, not a {wanted}; remove it or choose another path"
        )
    if not overwrite:
        raise OutputError(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    if owned is not None and any(path.iterdir()) and not owned(path):
        raise OutputError(
            f"output {str(path)!r} is a folder adatsq did not write, so --overwrite does not replace it; "
            "remove it yourself or choose another path"
        )


def _check_parents(path: Path) -> None:
    for parent in Path(os.path.abspath(path)).parents:  # nearest first, up to the first one that exists
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(
                    f"cannot write {str(path)!r}: folder {str(parent)!r} is read-only; choose a writable path"
                )
            return
        if os.path.lexists(parent):
            raise OutputError(
                f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder; choose another path"
            )


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary sibling file, then move it onto `path` (see module doc)."""
    path = Path(path)
    check_output(path, overwrite=True)
    target = Path(os.path.abspath(path))
    with _user_errors(path):
        created = _make_parents(target)
        tmp = _temporary(target, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode: 0666 minus umask
            mode = os.stat(tmp).st_mode & 0o7777
            _call(write, tmp)
            os.chmod(tmp, mode)  # writers that replace the file (safetensors does) leave it 0600
            _fsync(tmp)
            os.replace(tmp, target)
            _fsync(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            _remove_folders(created)
            raise
        remove_stale(target)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def output_folder(
    directory: str | os.PathLike[str], overwrite: bool = False, owned: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces `directory` (see module doc)."""
    check_output(directory, overwrite, folder=True, owned=owned)
    target = Path(os.path.abspath(directory))
    with _user_errors(Path(directory)):
        created = _make_parents(target)
        try:
            remove_stale(target)
            tmp = _temporary(target, "partial")
            os.mkdir(tmp)  # mode: 0777 minus umask
            try:
                yield tmp
                _fsync_tree(tmp)
                check_output(directory, overwrite, folder=True, owned=owned)  # it may have appeared since
                _replace_folder(tmp, target)
                _fsync(target.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except BaseException:
            _remove_folders(created)
            raise
        remove_stale(target)


def remove_stale(path: Path) -> None:
    """Remove what interrupted writes of `path` left beside it: temporaries of dead processes, `.old`."""
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        rest = entry.name[len(prefix) :]
        match = _TEMP.fullmatch(rest)
        # `.old` is the only copy left when a kill fell between the two renames of a replace: kept then
        if (rest == "old" and os.path.lexists(path)) or (match and not (match[1] and _alive(int(match[1])))):
            log.info("removing %s, left by an interrupted write", entry)
            _remove(entry)


def _temporary(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; return the ones created, outermost first."""
    created: list[Path] = []
    try:
        for parent in reversed(list(itertools.takewhile(lambda p: not p.exists(), path.parents))):
            try:
                os.mkdir(parent)
            except FileExistsError:  # another process made it meanwhile
                continue
            created.append(parent)
    except BaseException:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except OSError:  # something else was put there meanwhile: keep it
            return


def _replace_folder(tmp: Path, target: Path) -> None:
    """Rename `tmp` onto `target`; an existing folder there is renamed aside first, removed after."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's list of names, to the disk."""
    if os.name != "posix" and path.is_dir():  # folders cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
        _fsync(Path(root))


def _call(write: Callable[[str], None], tmp: Path) -> None:
    """Run `write`, turning an I/O failure that a native writer reports as text back into an OSError."""
    try:
        write(str(tmp))
    except OSError:
        raise
    except Exception as err:
        match = _RUST_OS_ERROR.search(str(err))
        if match is None:
            raise
        code = int(match[1])
        raise OSError(code, os.strerror(code), str(tmp)) from err


@contextmanager
def _user_errors(path: Path) -> Iterator[None]:
    """A full disk or a read-only place as one line naming the fix; other OSErrors pass unchanged."""
    path = Path(_IN_TEMPORARY.sub(r"\1", str(path)))  # name the output, not the folder it is built in
    try:
        yield
    except OSError as err:
        if err.errno in _NO_SPACE:
            raise OutputError(
                f"no space left on the device while writing {str(path)!r}; free some space or choose "
                "another path"
            ) from None
        if err.errno in _NO_ACCESS:
            raise OutputError(
                f"cannot write {str(path)!r}: {err.strerror} ({err.filename}); choose a writable path"
            ) from None
        raise


def link_tree(source: Path, target: Path) -> tuple[int, int]:
    """Reproduce the files under `source` in `target` without copying: hard links (the same inode, so
    the bytes exist once), or absolute symlinks where the filesystem refuses a hard link (another
    device). Returns (hard-linked, symlinked) file counts. Nothing is ever written through a link:
    adatsq replaces files by rename, which leaves the linked inode as it was."""
    linked = symlinked = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # a hub-cache snapshot holds symlinks into blobs/: link the blob itself
        try:
            os.link(real, dest)
            linked += 1
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise OutputError(f"cannot link {path} into {target}: {err.strerror}") from err
            os.symlink(real, dest)
            symlinked += 1
    if symlinked:
        log.warning(
            "%d file(s) of %s are symlinked, not hard-linked (another filesystem): the checkpoint needs "
            "them to stay where they are",
            symlinked,
            source,
        )
    return linked, symlinked
