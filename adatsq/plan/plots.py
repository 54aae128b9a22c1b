"""Pictures of plans: the cost/error frontier and the layer × segment bit map (Agg, atomic PNG writes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap

from adatsq.core.plots import new_figure, save_figure
from adatsq.plan.frontier import Frontier
from adatsq.plan.schema import SUPPORTED_BITS, Plan

_UNITS = {
    "avg_bits": "average weight bits per step",
    "bops": "bit-operations per step",
    "bytes": "stored bytes",
}


def plot_frontier(
    frontier: Frontier,
    path_png: str | os.PathLike[str],
    compare: Mapping[str, Frontier] | None = None,
    title: str | None = None,
) -> Path:
    """Error against cost for `frontier` (and baselines in `compare`, same kind), log error axis."""
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    curves = {frontier.method: frontier, **dict(compare or {})}
    for label, curve in curves.items():
        ax.plot(curve.costs(), curve.errors(), marker="o", label=label)
    errors = [e for curve in curves.values() for e in curve.errors()]
    if min(errors) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(_UNITS[frontier.kind])
    ax.set_ylabel(frontier.error_metric.replace("_", " "))
    ax.set_title(title or f"{frontier.method} frontier ({len(frontier.points)} plans)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path_png)


def plot_plan(plan: Plan, path_png: str | os.PathLike[str], max_labels: int = 60) -> Path:
    """Heat map of weight bits, one row per layer and one column per timestep segment."""
    bits = plan.bits_array()
    n_layers, n_seg = bits.shape
    fig = new_figure(2.5 + 0.9 * n_seg, min(2.0 + 0.18 * n_layers, 40.0))
    ax = fig.subplots()
    levels = list(SUPPORTED_BITS)
    cmap = ListedColormap(["#b2182b", "#ef8a62", "#fddbc7", "#67a9cf", "#2166ac"][: len(levels)])
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, cmap.N)  # one equal colour band per bit-width
    image = ax.imshow(
        np.searchsorted(levels, bits), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
    )
    ax.set_xticks(range(n_seg), [f"{a}-{b - 1}" for a, b in plan.segments], rotation=45)
    ax.set_xlabel("sampler steps (segment)")
    if n_layers <= max_labels:
        ax.set_yticks(range(n_layers), plan.layer_names, fontsize=6)
    else:
        ax.set_ylabel(f"{n_layers} layers (plan order)")
    cbar = fig.colorbar(image, ax=ax, ticks=range(len(levels)))
    cbar.ax.set_yticklabels([str(b) for b in levels])
    cbar.set_label("weight bits")
    metrics = plan.metrics
    if "avg_bits" in metrics:
        ax.set_title(
            f"avg {metrics['avg_bits']:.2f} bits, {len(np.unique(bits))} bit-widths used", fontsize=9
        )
    return save_figure(fig, path_png)
