"""The package's import graph: no file cycles, and arrows only point down (DESIGN.md's layering).

Every import is read from the source with `ast`, including those inside functions, so a lazy import
cannot hide a cycle or a climb.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adatsq"

# package (first component under adatsq/) -> packages it must never import
FORBIDDEN = {
    "core": {
        "calibrate",
        "plan",
        "quant",
        "engine",
        "checkpoint",
        "export",
        "models",
        "tokens",
        "eval",
        "recipe",
        "cli",
    },
    "quant": {
        "calibrate", "plan", "engine", "checkpoint", "export", "models", "tokens", "eval", "recipe", "cli",
    },
    "plan": {"calibrate", "engine", "checkpoint", "export", "models", "tokens", "eval", "recipe", "cli"},
    "models": {"calibrate", "plan", "engine", "checkpoint", "export", "tokens", "eval", "recipe", "cli"},
    "calibrate": {"engine", "checkpoint", "export", "tokens", "eval", "recipe", "cli"},
    "checkpoint": {"engine", "export", "tokens", "eval", "cli"},
    # export reads checkpoints and plans and writes files: it never quantizes, calibrates or runs models
    "export": {"engine", "calibrate", "models", "recipe", "tokens", "eval", "cli"},
    "engine": {"export", "tokens", "eval", "cli"},
    "tokens": {"plan", "engine", "export", "eval", "cli"},
    "eval": {"engine", "export", "tokens", "cli"},
    "recipe": {"engine", "checkpoint", "export", "models", "tokens", "eval", "cli"},
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """adatsq modules imported by a file (a `from pkg import name` counts as pkg.name when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_file_imports_itself_through_a_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    # a package __init__ importing its own submodules is not a cycle of files
    cycles = [c for c in cycles if not any(a.startswith(b + ".") for a, b in zip(c[1:], c[:-1], strict=True))]
    assert cycles == []


def test_arrows_only_point_down(graph):
    climbs = sorted(
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if layer(target) in FORBIDDEN.get(layer(source), set())
    )
    assert climbs == []


def test_the_graph_sees_real_imports(graph):
    """Guard against a checker that passes because it reads nothing."""
    assert "adatsq.quant.scheme" in graph["adatsq.quant.gptq"]
    assert "adatsq.models.base" in graph["adatsq.models.resolve"]
    assert len(graph) > 60
