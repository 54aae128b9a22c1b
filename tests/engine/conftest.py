"""Tiny offline diffusers pipelines, built once per test session (each takes well under a second)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adatsq.models.diffusers.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_pipeline_dir(family)`: folder of that family's tiny pipeline (saved once, then reused)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_pipeline(family, tmp_path_factory.mktemp(family))
        return built[family]

    return get
