"""MkDocs hooks: every spec example validates, the parity status table comes from parity rows.

* A fenced ``json`` block holding an object with ``layers`` (or ``extends``) is a spec example. Every example
  of a page is written to one temporary folder (so an example may extend another by name)
  and validated as ``samenet validate`` does: schema, expansion, shapes and the ``expect``
  counts. One that fails stops the build with its one-line error.
* ``<!-- samenet:row-columns -->`` becomes the column list of ``samenet.results``' docstring,
  the one place the columns are described.
* ``<!-- samenet:parity-status -->`` becomes the status table computed from the parity rows
  of the results store (``$SAMENET_RESULTS``, else ``results/``): ``samenet.tables.parity_status``.

The core tests run the same functions (tests/core/test_docs.py), so CI checks the examples
without MkDocs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

FENCE = re.compile(r"^```json[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
PARITY_MARKER = "<!-- samenet:parity-status -->"
COLUMNS_MARKER = "<!-- samenet:row-columns -->"


def spec_examples(markdown: str) -> list[dict]:
    """The spec examples of a page: fenced json blocks holding an object with ``layers`` (or ``extends``)."""
    found = []
    for match in FENCE.finditer(markdown):
        try:
            doc = json.loads(match.group(1))
        except json.JSONDecodeError as exc:
            raise ValueError(f"a json block does not parse: {exc}") from None
        if isinstance(doc, dict) and ("layers" in doc or "extends" in doc):
            found.append(doc)
    return found


def check_spec_examples(markdown: str, where: str) -> list[str]:
    """Validates every spec example of a page; returns one line per example ('name: ok, ...')."""
    from samenet import zoo
    from samenet.errors import SpecError

    examples = spec_examples(markdown)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for doc in examples:
            Path(tmp, f"{doc.get('name', 'unnamed')}.json").write_text(json.dumps(doc))
        for doc in examples:
            file = Path(tmp, f"{doc.get('name', 'unnamed')}.json")
            try:
                ir = zoo.validate(str(file))
            except SpecError as exc:
                raise ValueError(f"{where}: spec example '{doc.get('name')}' does not validate: {exc}") from None
            lines.append(f"{ir.name}: ok ({ir.trainable_params} params)")
    return lines


def parity_status_markdown(root: str | Path | None = None) -> str:
    """The parity status table (markdown) from the parity rows of a store, or a sentence without rows."""
    from samenet.report import markdown_table
    from samenet.results import default_root, load
    from samenet.tables import parity_status

    root = Path(root) if root else default_root()
    rows = load(root, "parity")
    status = parity_status(rows)
    if status.empty:
        return (f"*No parity rows in `{root}` when these pages were built: run `samenet parity "
                "--backends all --models all` (rows go to `results/parity/`), then rebuild.*")
    head = ["backend", "workers", "rows", "pass", "fp32-bound", "mismatch", "other", "measured", "not passing"]
    out = markdown_table(head, status[head].astype(str).values.tolist())
    return "\n".join(out) + f"\n\n*Generated from the {len(rows)} parity rows of `{root}` (newest per backend and model).*"


def row_columns_markdown() -> str:
    """The row columns as markdown, from the docstring of samenet.results."""
    from samenet import results

    doc = results.__doc__
    text = doc[doc.index("Columns of ``load()``"):].split("\n", 2)[2]
    return re.sub(r"``([^`]+)``", r"`\1`", "\n".join(line.rstrip() for line in text.splitlines())).strip()


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001  (MkDocs' hook signature)
    check_spec_examples(markdown, page.file.src_path)
    if COLUMNS_MARKER in markdown:
        markdown = markdown.replace(COLUMNS_MARKER, row_columns_markdown())
    if PARITY_MARKER in markdown:
        markdown = markdown.replace(PARITY_MARKER, parity_status_markdown(os.environ.get("SAMENET_RESULTS")))
    return markdown
