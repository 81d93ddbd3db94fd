"""The model registry: every ``specs/*.json`` is a model, found by name or alias.

Adding a network means adding one JSON file; tests and commands pick it up from here.
Extra spec folders can be named in ``SAMENET_SPECS`` (os.pathsep separated).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from .errors import SpecError, UsageError
from .ir import IR, build_ir, check_expected, check_test_input
from .spec import SCHEMA_PATH, read_document

SPEC_DIR = SCHEMA_PATH.parent


def spec_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SAMENET_SPECS", "").split(os.pathsep) if p]
    return [*extra, SPEC_DIR]


@lru_cache(maxsize=None)
def _index() -> dict[str, Path]:
    """Name and aliases -> file, for every spec file (first folder wins)."""
    found: dict[str, Path] = {}
    for folder in reversed(spec_dirs()):
        for path in sorted(folder.glob("*.json")):
            if path.resolve() == SCHEMA_PATH:
                continue
            found[path.stem] = path
            try:
                aliases = json.loads(path.read_text()).get("aliases", [])
            except (OSError, ValueError, AttributeError):
                aliases = []  # a broken file is reported when it is loaded, not here
            for alias in aliases if isinstance(aliases, list) else []:
                if isinstance(alias, str):
                    found.setdefault(alias, path)
    return found


def names() -> list[str]:
    """Registered model names (file stems), sorted."""
    return sorted({p.stem for p in _index().values()})


def path_of(model: str) -> Path:
    """File of a model given by name, alias or path."""
    if model.endswith(".json") or os.sep in model:
        return Path(model)
    index = _index()
    if model not in index:
        raise UsageError(f"unknown model '{model}' (see the 'list' command; known: {', '.join(names())})")
    return index[model]


@lru_cache(maxsize=64)
def _document(path: Path, mtime: float) -> dict:
    return read_document(path)


def document(model: str) -> tuple[dict, str]:
    path = path_of(model)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = -1.0
    return _document(path, mtime), str(path)


def load(model: str, input_shape: tuple[int, ...] | None = None, overrides: dict | None = None,
         check: bool = True) -> IR:
    """Loads a model's IR.

    Args:
        model: Name, alias or spec path.
        input_shape: Input (C, H, W) instead of the spec's default.
        overrides: Values of the spec's top-level args.
        check: Compare counts with the spec's ``expect`` (only at the default input and args).
    """
    doc, file = document(model)
    if doc["name"] != Path(file).stem:
        raise SpecError(f"name '{doc['name']}' differs from the file name '{Path(file).stem}': rename one of them "
                        "(the registry finds a spec by its file name)", file=file, path="$.name")
    ir = build_ir(doc, file, input_shape, overrides)
    if check and input_shape in (None, tuple(doc["input"])) and not overrides:
        check_expected(ir)
    return ir


def input_text(model: str, shape=None) -> str | None:
    """A row's ``input``, in its one form ``"3x224x224"``: ``shape`` (a sequence or that text),
    or the spec's default input where it is None; None for a spec that cannot be read."""
    if isinstance(shape, str):
        return shape
    if shape is None or shape != shape:  # None, or NaN from a table's missing value
        try:
            shape = document(model)[0]["input"]
        except Exception:  # noqa: BLE001  (a row of a spec since removed or broken: leave it unknown)
            return None
    return "x".join(str(int(d)) for d in shape)


def test_input(model: str) -> tuple[int, ...]:
    """The reduced input for tests, or the default input if the spec has none."""
    doc, _ = document(model)
    return tuple(doc.get("test_input") or doc["input"])


def load_for_test(model: str) -> IR:
    """The IR at the spec's test input."""
    return load(model, test_input(model), check=False)


def validate(model: str) -> IR:
    """Full check of a spec: schema, expansion, shapes, expected counts, test input."""
    ir = load(model)
    doc, _ = document(model)
    if "test_input" in doc:
        check_test_input(ir, load(model, tuple(doc["test_input"]), check=False))
    return ir
