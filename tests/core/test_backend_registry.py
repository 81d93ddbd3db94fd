"""The registry, read without any framework: packages, builder tables, capabilities and wiring.

Each check here fails on the mistake it names: a backend package that is not registered (or
the reverse), a builder table that differs from the op table, an undeclared device or
precision, a tox env or CI matrix entry that lists other backends than the registry, a pin
that tox does not install, an op without a backward, an op of the zoo that the quick training
set never trains inside a network.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from samenet import backend as registry
from samenet import conformance, zoo
from samenet.ops import OPS, TRAITS, spec_ops

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = {"torch", "tensorflow", "keras", "mxnet", "paddle", "mindspore", "jax", "jaxlib"}
LIBRARIES = {"keras"}  # packages in backends/ that backends share; not backends themselves
PROJECT_BACKENDS = [n for n in registry.names() if registry.registry()[n].startswith("samenet.backends.")]
FRAMEWORK_BACKENDS = [n for n in PROJECT_BACKENDS if not registry.get(n).reference]


def test_every_backend_package_is_registered_and_every_registered_backend_is_a_package():
    packages = {p.parent.name for p in (ROOT / "backends").glob("*/__init__.py")} - LIBRARIES
    registered = {registry.registry()[n].split(":")[0].split(".")[2] for n in PROJECT_BACKENDS}
    assert packages == registered


def test_backend_metadata_imports_no_framework():
    modules = sorted({registry.registry()[n].split(":")[0] for n in PROJECT_BACKENDS})
    code = ("import importlib, sys\n"
            "from samenet import backend as r\n"
            f"infos = [r.get(n) for n in {PROJECT_BACKENDS!r}]\n"
            "[(i.available(), i.installed_version(), i.env_vars(2, True), i.capabilities) for i in infos]\n"
            f"print(sorted(set(sys.modules) & set({sorted(FRAMEWORKS)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", (modules, out.stdout)


def test_harness_never_imports_the_backends_package():
    offenders = []
    for path in (ROOT / "harness").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {n}" for n in names
                           if n.split(".")[0] == "backends" or n.split(".")[:2] == ["samenet", "backends"]]
    assert offenders == []


def builder_keys(info) -> list[str]:
    """The keys of the module-level ``BUILDERS = {...}`` literal, read as text (no import)."""
    spec = importlib.util.find_spec(info.builders_module)
    assert spec is not None and spec.origin, f"{info.name}: no module {info.builders_module}"
    return builder_keys_in(Path(spec.origin), info.name)


def builder_keys_in(path: Path, name: str) -> list[str]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "BUILDERS" and isinstance(node.value, ast.Dict):
            keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            assert len(keys) == len(node.value.keys), f"{name}: BUILDERS keys must be string literals"
            return keys
    raise AssertionError(f"{name}: {path} has no module-level BUILDERS = {{...}} dict literal")


def builder_table_problems(info, keys: list[str]) -> list[str]:
    """How a builder table differs from the op table (an ``op:NAME/*`` known gap excuses NAME)."""
    excused = {op for op in spec_ops() if info.gap_reason(f"op:{op}/any")}
    problems = []
    if len(keys) != len(set(keys)):
        problems.append("a builder is listed twice")
    missing = sorted(set(spec_ops()) - set(keys) - excused)
    if missing:
        problems.append(f"no builder for {missing} (add one to BUILDERS, or an op:NAME/* known gap)")
    unknown = sorted(set(keys) - set(spec_ops()))
    if unknown:
        problems.append(f"builders for ops not in the op table: {unknown}")
    return problems


@pytest.mark.parametrize("name", FRAMEWORK_BACKENDS)
def test_builder_table_equals_the_op_table(name):
    info = registry.get(name)
    assert builder_table_problems(info, builder_keys(info)) == [], name


def test_a_builder_table_without_an_op_is_caught(tmp_path):
    """Negative control: a table that lacks gelu and has a stray key fails the check above."""
    keys = [k for k in spec_ops() if k != "gelu"] + ["swish2"]
    path = tmp_path / "impl.py"
    path.write_text("BUILDERS = {" + ", ".join(f"{k!r}: None" for k in keys) + "}\n")
    problems = builder_table_problems(registry.get("numpy"), builder_keys_in(path, "fake"))
    assert problems == ["no builder for ['gelu'] (add one to BUILDERS, or an op:NAME/* known gap)",
                        "builders for ops not in the op table: ['swish2']"]


@pytest.mark.parametrize("name", registry.names())
def test_capabilities_are_declared_in_known_terms(name):
    info = registry.get(name)
    caps = info.capabilities
    assert set(caps.devices) <= set(registry.DEVICE_KINDS) and "cpu" in caps.devices
    assert set(caps.precisions) <= set(registry.PRECISIONS) and caps.precisions
    assert caps.train or caps.infer
    assert info.exec_modes and all(values for values in info.options.values())
    assert info.bn_variance in ("unbiased", "biased")
    assert info.impl.count(":") == 1
    # Data parallel: the capability and its declaration go together, in the oracle's terms.
    dp = info.data_parallel
    assert caps.data_parallel == (dp is not None)
    if dp is not None:
        assert caps.train and dp.bn in registry.DP_BN_SEMANTICS and dp.ports >= 1
        assert set(dp.transports) <= set(caps.devices) and "cpu" in dp.transports


def test_a_data_parallel_declaration_with_an_unknown_rank_exit_is_refused():
    dp = dict(engine="e", transports={"cpu": "t"}, launcher="l")
    assert registry.DataParallel(**dp, rank_exit="immediate").rank_exit == "immediate"
    with pytest.raises(ValueError, match="rank_exit"):
        registry.DataParallel(**dp, rank_exit="soon")


def test_undeclared_precision_and_device_are_unsupported():
    from samenet.backend import BuildConfig
    from samenet.errors import UnsupportedError

    info = registry.get("numpy")
    with pytest.raises(UnsupportedError, match="precision amp-bf16 not supported"):
        info.resolve_config(BuildConfig(precision="amp-bf16"))
    with pytest.raises(UnsupportedError, match="device cuda not supported"):
        info.resolve_config(BuildConfig(device="cuda"))


# --------------------------------------------------------------------------- wiring


def tox_config() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    return config


def _list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]


def test_tox_envs_and_labels_list_exactly_the_registered_backends():
    config = tox_config()
    envs = {s.removeprefix("testenv:") for s in config.sections() if s.startswith("testenv:")}
    assert envs == {"core", "docs", *FRAMEWORK_BACKENDS, *(f"{n}-test" for n in FRAMEWORK_BACKENDS)}
    assert _list(config["tox"]["env_list"]) == ["core", *FRAMEWORK_BACKENDS]
    labels = {key.strip(): _list(value) for key, _, value in
              (line.partition("=") for line in config["tox"]["labels"].splitlines() if "=" in line)}
    assert labels["test"] == ["core", *(f"{n}-test" for n in FRAMEWORK_BACKENDS)]


@pytest.mark.parametrize("name", FRAMEWORK_BACKENDS)
def test_tox_env_installs_the_pins_and_tests_the_backend(name):
    config = tox_config()
    info = registry.get(name)
    # "{env:SAMENET_TORCH_DEPS:torch==2.13.0}" installs torch==2.13.0 unless overridden
    deps = [re.sub(r"^\{env:[A-Z_]+:(.*)\}$", r"\1", d) for d in _list(config[f"testenv:{name}"].get("deps", ""))]
    assert info.pins, f"{name}: declares no pins"
    assert sorted(info.pins) == sorted(deps), f"{name}: tox installs {deps}, the backend declares {list(info.pins)}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras.get(name, [])) == sorted(info.pins), f"{name}: the extra samenet[{name}] is not its pins"
    assert f"--backend {name} " in config[f"testenv:{name}-test"]["commands"]
    # The main job ends with a table and a report (with plots: matplotlib) of every backend measured here.
    commands = _list(config[f"testenv:{name}"]["commands"])
    assert commands[-2:] == ["samenet table --quick", "samenet report --quick"], commands
    assert "report" in _list(config[f"testenv:{name}"]["extras"])


def test_ci_matrix_lists_exactly_the_registered_backends():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert workflow["jobs"]["backend"]["strategy"]["matrix"]["backend"] == FRAMEWORK_BACKENDS


# --------------------------------------------------------------------------- op table


def test_every_op_has_a_backward_and_known_traits():
    for name, op in OPS.items():
        assert set(op.traits) <= set(TRAITS), f"{name}: unknown traits {set(op.traits) - set(TRAITS)}"
        assert op.backward is not None or "internal" in op.traits, f"{name}: no backward"


def test_quick_training_set_trains_every_op_the_zoo_uses_inside_a_network():
    used_by_zoo = {n.op for m in zoo.names() for n in zoo.load_for_test(m).nodes} - {"input"}
    trained = {n.op for m in conformance.QUICK_TRAINING_MODELS for n in zoo.load_for_test(m).nodes}
    untrained = used_by_zoo - trained
    assert untrained <= set(conformance.QUICK_TRAINING_EXCEPTIONS), (
        f"the quick training set never trains {sorted(untrained - set(conformance.QUICK_TRAINING_EXCEPTIONS))}: add "
        "a network that uses it to QUICK_TRAINING_MODELS, or the op to QUICK_TRAINING_EXCEPTIONS with the reason")
    assert set(conformance.QUICK_TRAINING_EXCEPTIONS) <= used_by_zoo - trained, "a stale exception"
    # Ops no spec uses yet (gelu) and the exceptions are trained by the op tier: every op has a case.
    assert set(spec_ops()) <= {op for _, op, _ in conformance.op_case_ids()}
