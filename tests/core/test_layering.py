"""harness/ never imports a framework; the cell process never imports pandas or plotting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FRAMEWORKS = {"torch", "tensorflow", "keras", "mxnet", "paddle", "mindspore", "jax", "jaxlib"}
HARNESS = Path(__file__).resolve().parents[2] / "harness"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_framework_import_in_harness_sources():
    offenders = {p.name: imported_roots(p) & FRAMEWORKS for p in HARNESS.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_harness_module_loads_no_framework():
    modules = sorted(f"samenet.{p.stem}" for p in HARNESS.glob("*.py") if p.stem not in ("__main__", "__init__"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import samenet.backends\n"
            f"print(sorted(set(sys.modules) & set({sorted(FRAMEWORKS)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def harness_import_graph() -> dict[str, set[str]]:
    """harness module -> the harness modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in HARNESS.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("samenet."):
                deps.add(node.module.split(".")[1])
        graph[path.stem] = {d for d in deps if (HARNESS / f"{d}.py").exists()} - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_harness_modules_import_each_other_without_cycles():
    assert find_cycle(harness_import_graph()) is None


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"cli": {"commands"}, "commands": {"args", "cli"}, "args": set()}) == ["cli", "commands", "cli"]
