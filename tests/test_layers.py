"""The layers point one way (DESIGN.md §3): no import cycle among the package's modules (imports
inside functions count: they close cycles at run time), the kernels import nothing of elbokto,
and only the CLI imports the demo; tests take shared helpers from helper modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c`` counts a.b, and a.b.c
    when that is a module), by reading the sources."""
    files = [
        p
        for package in ("elbokto", "elbokto_kernels")
        for p in (ROOT / package).rglob("*.py")
        if "build" not in p.relative_to(ROOT).parts
    ]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        # A module's own packages are imported before it anyway (Python's rule), so an edge to
        # one of them is no cycle of ours: ``from . import memory`` counts memory alone.
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and t not in ancestors}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layers_point_one_way():
    graph = import_graph()
    assert graph["elbokto.cli"]  # the graph sees imports inside functions
    for module, targets in graph.items():
        if module.startswith("elbokto_kernels"):
            assert not {t for t in targets if t.startswith("elbokto.")}, module
        if not module.startswith(("elbokto.demo", "elbokto.cli")):
            assert not {t for t in targets if t.startswith("elbokto.demo")}, module


def test_tests_take_helpers_from_helper_modules():
    """A test module imports shared helpers from a helper module (training_runs, online_runs,
    distributed, ...), never from another test module (which pytest then imports a second time):
    scripts the tests write for other processes included, so the source text is searched."""
    pattern = re.compile(r"^\s*(from|import)\s+test_\w+", re.MULTILINE)
    offenders = [
        f"{path.name}: {match.group(0).strip()}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for match in pattern.finditer(path.read_text())
    ]
    assert not offenders, offenders
