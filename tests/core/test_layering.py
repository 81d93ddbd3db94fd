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
    modules = sorted(f"harness.{p.stem}" for p in HARNESS.glob("*.py") if p.stem not in ("__main__", "__init__"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import backends\n"
            f"print(sorted(set(sys.modules) & set({sorted(FRAMEWORKS)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
