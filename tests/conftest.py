"""Shared fixtures and the --backend option of the conformance suite."""

from __future__ import annotations

import json
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--backend", action="append", default=[],
                     help="backend(s) the conformance suite runs against (repeatable)")
    parser.addoption("--training-models", default="quick",
                     help="specs whose two-step training parity runs: quick (default), all, or a comma list")
    parser.addoption("--forward-models", default=os.environ.get("SAMENET_FORWARD_MODELS") or "all",
                     help="specs whose forward parity runs: all (default; $SAMENET_FORWARD_MODELS), ci "
                          "(samenet.conformance.CI_FORWARD_SKIPPED left out), or a comma list")


@pytest.fixture
def write_spec(tmp_path):
    """Writes a spec (dict or raw text) to a file and returns its path."""

    def write(content, name="tiny.json"):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
        return path

    return write
