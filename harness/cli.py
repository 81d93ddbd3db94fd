"""Command-line interface: ``samenet COMMAND`` or ``python -m samenet COMMAND``.

Every user error (bad spec, bad option, unknown model) ends as one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .args import COMMANDS, Parser
from .errors import HarnessError, UsageError

PROG = "samenet"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from . import commands, commands_report, commands_run  # noqa: F401  (registers the commands)

    parser = Parser(prog=PROG, description="One CNN description, built identically in every framework, "
                     "proven identical, then measured.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (help, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        getattr(fn, "configure", lambda p: None)(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
