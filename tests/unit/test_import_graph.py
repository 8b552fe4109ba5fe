"""The package's import graph has no cycles, counting every import (top-level, inside functions
and under TYPE_CHECKING), so the layering in docs/architecture.md stays real."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "vmlab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """vmlab modules `path` imports (`from vmlab.x import y` counts vmlab.x.y when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    graph = {}
    for mod, path in files.items():
        # A package's own __init__ importing its submodules is how it re-exports; a submodule
        # importing its parent package would be the cycle, and that is still counted.
        graph[mod] = {m for m in _imports(path, known) if m != mod
                      and not (path.name == "__init__.py" and m.startswith(mod + "."))}
        # importing a submodule imports its parent packages first
        graph[mod] |= {m.rsplit(".", 1)[0] for m in graph[mod]
                       if m.rsplit(".", 1)[0] in known and m.rsplit(".", 1)[0] != "vmlab"
                       and not mod.startswith(m.rsplit(".", 1)[0])}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_cycle_finder_sees_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "vmlab.scenario.model" in graph["vmlab.scenario.validate"]
    assert "vmlab.kernelioctl" in graph["vmlab.cids"]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
