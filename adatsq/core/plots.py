"""Figures without pyplot: no backend switch, no global state, atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from adatsq.core.io import atomic_write


def new_figure(width: float = 6.0, height: float = 3.5) -> Figure:
    """A standalone figure (Agg canvas on save); use `fig.subplots()` for axes."""
    return Figure(figsize=(width, height))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
