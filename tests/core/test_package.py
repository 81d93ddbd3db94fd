"""The wheel: built from the checkout, installed in a fresh venv, it works from any folder."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding only the wheel (its dependencies are this env's, on a path line: a .pth
    line is not a site folder, so this env's editable install of the checkout is not seen)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("samenet-*.whl"))
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps-of-the-test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, env, elsewhere


def _run(env: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAMENET_", "PYTHON"))}
    return subprocess.run([str(env / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=clean, capture_output=True,
                          text=True, timeout=300)


def test_the_wheel_ships_the_specs(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("samenet/specs/")}
    assert shipped == {p.name for p in (ROOT / "specs").glob("*.json")}
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"samenet"}  # harness/ and backends/ are samenet and samenet.backends
    assert "samenet/backends/torch/__init__.py" in names and "samenet/cell.py" in names


def test_a_users_own_harness_and_backends_modules_are_not_shadowed(installed, tmp_path):
    _, env, _ = installed
    (tmp_path / "harness.py").write_text("WHOSE = 'the user'\n")
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "__init__.py").write_text("raise ImportError('the user backends package')\n")
    listed = _run(env, tmp_path, "python", "-m", "samenet", "list")  # the folder is on sys.path first
    assert listed.returncode == 0, listed.stderr
    assert "resnet50" in listed.stdout
    theirs = _run(env, tmp_path, "python", "-c", "import harness; print(harness.WHOSE)")
    assert theirs.stdout.strip() == "the user", theirs.stderr


def test_the_installed_package_lists_and_describes_models_from_another_folder(installed):
    _, env, elsewhere = installed
    where = _run(env, elsewhere, "python", "-c", "import samenet, json; print(json.dumps(samenet.__file__))")
    assert where.returncode == 0, where.stderr
    assert Path(json.loads(where.stdout)).is_relative_to(env), where.stdout  # the wheel's, not the checkout's
    listed = _run(env, elsewhere, "samenet", "list")
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in ("lenet5", "resnet50", "efficientnet_b0"))
    info = _run(env, elsewhere, "samenet", "info", "resnet50")
    assert info.returncode == 0, info.stderr
    assert "25,557,032" in info.stdout  # torchvision's count
    assert not (elsewhere / "results").exists()  # reading commands write nothing
