"""The conformance suite runs against the backends named by ``--backend``.

A named backend that is not installed is an error, not a skip. Without ``--backend`` (the
framework-free core env) the suite is skipped as a whole. Known gaps come from the backend's
``known_gaps`` data and become strict xfails with the backend's reason.
"""

from __future__ import annotations

import pytest

from harness import backend as registry
from harness.conformance import training_models

_instances: dict[str, object] = {}


def pytest_configure(config):
    for name in config.getoption("--backend"):
        cls = registry.get(name)
        if not cls.available():
            raise pytest.UsageError(f"--backend {name}: framework '{cls.framework}' is not installed in this env")


def pytest_generate_tests(metafunc):
    if "training_model" in metafunc.fixturenames:
        metafunc.parametrize("training_model", training_models(metafunc.config.getoption("--training-models")))
    if "backend_name" in metafunc.fixturenames:
        names = metafunc.config.getoption("--backend")
        if names:
            metafunc.parametrize("backend_name", names, scope="session")
        else:
            metafunc.parametrize("backend_name", [pytest.param("none", marks=pytest.mark.skip(
                reason="no --backend given (conformance runs in each backend's test env)"))])


@pytest.fixture(scope="session")
def backend_cls(backend_name):
    cls = registry.get(backend_name)
    if backend_name not in _instances:
        probe = cls()
        probe.import_framework()
        probe.configure(registry.default_threads(), tuned=True)
        _instances[backend_name] = probe
    return cls


@pytest.fixture
def new_backend(backend_cls):
    """Makes a fresh backend instance (framework already imported)."""

    def make():
        b = backend_cls()
        b.import_framework()
        return b

    return make


@pytest.fixture
def known_gap(request, backend_cls):
    """Call with the conformance id; marks the test as a strict xfail if the backend lists it."""

    def check(test_id: str) -> None:
        reason = backend_cls.gap_reason(test_id)
        if reason:
            request.node.add_marker(pytest.mark.xfail(reason=f"known gap: {reason}", strict=True))

    return check
