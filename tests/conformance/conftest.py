"""The conformance suite runs against the backends named by ``--backend``.

A named backend that is not installed is an error, not a skip. Without ``--backend`` (the
framework-free core env) the suite is skipped as a whole. Known gaps come from the backend's
``known_gaps`` data and become strict xfails with the backend's reason; a test of something
the backend does not declare in its capabilities (training, fixed masks, set_lr, a float64
build) is skipped with that reason: an inference-only backend is a supported shape.
"""

from __future__ import annotations

import pytest

from samenet import backend as registry
from samenet.conformance import forward_models, training_models

_instances: dict[str, object] = {}


def pytest_configure(config):
    for name in config.getoption("--backend"):
        info = registry.get(name)
        if not info.available():
            raise pytest.UsageError(f"--backend {name}: framework '{info.framework}' is not installed in this env")


def pytest_generate_tests(metafunc):
    if "training_model" in metafunc.fixturenames:
        metafunc.parametrize("training_model", training_models(metafunc.config.getoption("--training-models")))
    if "forward_model" in metafunc.fixturenames:
        metafunc.parametrize("forward_model", forward_models(metafunc.config.getoption("--forward-models")))
    if "backend_name" in metafunc.fixturenames:
        names = metafunc.config.getoption("--backend")
        if names:
            metafunc.parametrize("backend_name", names, scope="session")
        else:
            metafunc.parametrize("backend_name", [pytest.param("none", marks=pytest.mark.skip(
                reason="no --backend given (conformance runs in each backend's test env)"))])


@pytest.fixture(scope="session")
def backend_info(backend_name):
    info = registry.get(backend_name)
    if backend_name not in _instances:
        probe = info.create()
        probe.configure(registry.default_threads(), tuned=True)
        _instances[backend_name] = probe
    return info


@pytest.fixture
def new_backend(backend_info):
    """Makes a fresh backend instance (framework already imported)."""
    return backend_info.create


@pytest.fixture
def requires(backend_info):
    """Call with capability names; skips the test when the backend does not declare one."""

    def check(*capabilities: str) -> None:
        for name in capabilities:
            if not getattr(backend_info.capabilities, name):
                pytest.skip(f"backend {backend_info.name} does not declare the {name} capability")

    return check


@pytest.fixture
def known_gap(request, backend_info):
    """Call with the conformance id; marks the test as a strict xfail if the backend lists it."""

    def check(test_id: str) -> None:
        reason = backend_info.gap_reason(test_id)
        if reason:
            request.node.add_marker(pytest.mark.xfail(reason=f"known gap: {reason}", strict=True))

    return check
