"""The sub-command registry and the option parsers the commands share.

Commands register themselves here (``@command``); samenet.cli imports them and runs one. A
command module imports this module, never samenet.cli, so the two do not import each other.
"""

from __future__ import annotations

import argparse
from typing import Callable

from .errors import UsageError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit code 2 (UsageError)."""

    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message}")


def command(name: str, help: str):
    """Registers ``fn(args) -> exit code`` as a sub-command; ``fn.configure(parser)`` adds options."""

    def register(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return register


def parse_shape(text: str) -> tuple[int, ...]:
    """``3x224x224`` or ``3,224,224`` -> (3, 224, 224)."""
    try:
        dims = tuple(int(p) for p in text.replace(",", "x").lower().split("x"))
    except ValueError:
        raise UsageError(f"--input: expected CxHxW such as 3x224x224, got '{text}'") from None
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(f"--input: expected three positive sizes CxHxW, got '{text}'")
    return dims


def parse_sets(items: list[str] | None) -> dict:
    """``--set classes=10`` pairs -> {"classes": 10} (values parsed as JSON where possible)."""
    import json

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set: expected NAME=VALUE, got '{item}'")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero (a timeout of 0 kills at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got '{text}'") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got '{text}'")
    return value


def parse_list(text: str, option: str, known: list[str] | None = None, all_value: list[str] | None = None) -> list[str]:
    """Comma-separated list with ``all``; checks against ``known`` when given."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option}: empty list")
    if items == ["all"] and all_value is not None:
        return list(all_value)
    if known is not None:
        bad = [i for i in items if i not in known]
        if bad:
            raise UsageError(f"{option}: unknown value '{bad[0]}' (known: {', '.join(known)})")
    return items
