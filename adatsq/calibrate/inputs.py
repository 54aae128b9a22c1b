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
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise CalibrationError(
            f"calibration file {str(path)!r} holds no inputs; add one prompt/label per line"
        )
    return adapter.parse_inputs(lines)
