"""Module surgery shared by the engine (builds quantized layers) and the loader (restores them)."""

from __future__ import annotations

from torch import nn


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` (dotted path) of `root` with `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
