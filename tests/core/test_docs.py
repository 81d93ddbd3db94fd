"""The docs: every spec example validates, the parity status is computed from rows, links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def hooks():
    spec = importlib.util.spec_from_file_location("samenet_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")))
def test_every_spec_example_in_the_docs_validates(page):
    hooks().check_spec_examples((DOCS / page).read_text(), page)


def test_the_spec_language_page_shows_every_construct():
    text = (DOCS / "spec-language.md").read_text()
    examples = hooks().spec_examples(text)
    assert len(examples) >= 8
    dump = repr(examples)
    for construct in ('"block"', '"repeat"', '"start"', '"first"', '"each"', '"seq"', '"add"', '"concat"', '"mul"',
                      '"aux"', '"inputs"', '"defaults"', '"extends"', '"drop_path"', '"test_input"', "'name': ''",
                      "'add': [[]"):
        assert construct.replace('"', "'") in dump, construct


def test_a_broken_spec_example_stops_the_build():
    page = ('```json\n{"name": "broken", "title": "t", "year": 2026, "paper": "p", "reproduces": "r", "input": [1, 8, 8],\n'
            ' "layers": [{"op": "linear", "out_features": 3}], "expect": {"params": 1, "gmacs": 1}}\n```\n')
    with pytest.raises(ValueError, match="spec example 'broken' does not validate: .*linear expects inputs"):
        hooks().check_spec_examples(page, "page.md")


def test_the_parity_status_counts_the_newest_row_of_each_model():
    from samenet.tables import parity_status

    rows = pd.DataFrame([
        {"backend": "torch", "model": "lenet5", "status": "mismatch", "timestamp": "2026-12-01T00:00:00+00:00"},
        {"backend": "torch", "model": "lenet5", "status": "pass", "timestamp": "2026-12-02T00:00:00+00:00"},
        {"backend": "torch", "model": "googlenet", "status": "fp32-bound", "train_worst_ratio": 2.5,
         "timestamp": "2026-12-02T00:00:00+00:00"},
        {"backend": "tf", "model": "lenet5", "status": "crash", "timestamp": "2026-12-03T00:00:00+00:00"},
    ])
    status = parity_status(rows).set_index("backend")
    assert status.loc["torch", ["rows", "pass", "fp32-bound", "mismatch", "other"]].tolist() == [2, 1, 1, 0, 0]
    assert status.loc["torch", "not passing"] == "googlenet: fp32-bound 2.5x"
    assert status.loc["torch", "measured"] == "2026-12-02"  # the older lenet5 row is not counted
    assert status.loc["tf", ["rows", "other"]].tolist() == [1, 1]


def test_the_docs_table_says_so_when_there_are_no_parity_rows(tmp_path):
    assert "No parity rows" in hooks().parity_status_markdown(tmp_path)


def test_every_page_is_in_the_nav_and_every_relative_link_resolves():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python/name:", ""))

    def pages(nav):
        for item in nav:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(config["nav"]))
    assert listed == {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    broken = []
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
