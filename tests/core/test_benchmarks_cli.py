"""benchmarks/handwritten.py: bad use and unusable impls give one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HANDWRITTEN = Path(__file__).resolve().parents[2] / "benchmarks" / "handwritten.py"


def _run(*args):
    return subprocess.run([sys.executable, str(HANDWRITTEN), *args], capture_output=True, text=True, timeout=120)


def test_wrong_arguments_print_the_usage():
    for args in ((), ("--check",), ("--check", "mindspore_resnet50"), ("a", "b")):
        proc = _run(*args)
        assert proc.returncode == 1, args
        assert proc.stderr.strip().splitlines() == ["usage: handwritten.py IMPL CONFIG.json OUT.json "
                                                    "[--rank R RENDEZVOUS.json] | --check IMPL MODEL [BATCH]"], args


def test_check_of_an_impl_this_interpreter_cannot_import_is_exit_2_in_one_line():
    proc = _run("--check", "no_such_impl", "resnet50")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("handwritten.py --check: cannot import impls/no_such_impl.py with ")
