"""The spec commands as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from samenet import zoo
from samenet.cli import main


def test_list_shows_every_model_with_counts(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in zoo.names():
        ir = zoo.load(name)
        assert name in out
        assert f"{ir.trainable_params:,}" in out


def test_info_resnet50(capsys):
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out
    assert "4.089 GMACs" in out
    assert "layer4.2.conv3" in out and "(2048, 7, 7)" in out


def test_info_with_input_and_args(capsys):
    assert main(["info", "resnet18", "--input", "3x64x64", "--set", "classes=10", "--params"]) == 0
    out = capsys.readouterr().out
    assert "(512, 2, 2)" in out and "fc.weight" in out and "(10, 512)" in out


def test_python_dash_m_and_bad_options():
    run = subprocess.run([sys.executable, "-m", "samenet", "info", "nosuchnet"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "unknown model 'nosuchnet'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "samenet", "list", "--frobnicate"], capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "unrecognized arguments: --frobnicate" in run.stderr


def test_bad_input_option(capsys):
    assert main(["info", "resnet18", "--input", "3x64"]) == 2
    assert "expected three positive sizes" in capsys.readouterr().err


def test_ops_lists_the_table(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for op in ("conv2d", "count_include_pad", "lrn", "channel_shuffle", "drop_path"):
        assert op in out
