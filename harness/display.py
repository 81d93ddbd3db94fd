"""Terminal output: rich tables that stay readable when piped into a log."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Sequence


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", 200))
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence], right: Sequence[str] = (),
          caption: str | None = None):
    """A rich Table; columns named in ``right`` are right-aligned.

    Every title, header and cell is plain text: an error message, a spec's name or a path that
    holds ``[...]`` is shown as it is, never read as rich markup (which could fail the table).
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title) if title else None, caption=Text(caption) if caption else None, box=box.SIMPLE_HEAD,
              title_justify="left", caption_justify="left")
    for c in columns:
        t.add_column(Text(c), justify="right" if c in right else "left", overflow="fold")
    for r in rows:
        t.add_row(*[Text(str(v)) for v in r])
    return t


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_macs(macs: int) -> str:
    if macs >= 1e9:
        return f"{macs / 1e9:.3f} G"
    if macs >= 1e6:
        return f"{macs / 1e6:.2f} M"
    if macs >= 1e3:
        return f"{macs / 1e3:.1f} K"
    return str(macs)
