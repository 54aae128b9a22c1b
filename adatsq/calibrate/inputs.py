"""Calibration sets on disk: one input (prompt or class label) per line; '#' starts a comment line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adatsq.errors import CalibrationError
from adatsq.models.base import ModelAdapter


def read_calibration(path: str | Path, adapter: ModelAdapter) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(
            f"calibration file {str(path)!r} not found; see calib/README.md for the format"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CalibrationError(f"calibration file {str(path)!r} cannot be read: {err.strerror}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise CalibrationError(
            f"calibration file {str(path)!r} is not UTF-8 text (byte {data[err.start]:#04x} on line {line}); "
            "save it as UTF-8, one prompt / label per line"
        ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise CalibrationError(
            f"calibration file {str(path)!r} holds a NUL byte on line {line}: it is binary; "
            "write one prompt / label per line"
        )
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise CalibrationError(
            f"calibration file {str(path)!r} holds no inputs; add one prompt/label per line"
        )
    return adapter.parse_inputs(lines)
