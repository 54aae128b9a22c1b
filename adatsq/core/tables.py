"""Plain-text tables for `adatsq inspect` (checkpoints, float models, plans, frontiers)."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a dashed rule."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
