"""Every spec of the registry: parameter counts, canonical weights in and out, forward vs reference."""

from __future__ import annotations

import numpy as np

from samenet.backend import BuildConfig
from samenet.conformance import ATOL, RTOL, model_case


def test_model_matches_reference(backend_name, new_backend, known_gap, forward_model):
    """Specs: every one by default, ``--forward-models ci`` in CI (samenet.conformance.forward_models)."""
    model = forward_model
    known_gap(f"model:{model}")
    c = model_case(model)
    b = new_backend()
    b.build(c.ir, BuildConfig())
    assert b.param_counts() == (c.ir.trainable_params, c.ir.non_trainable_params), "parameter counts"
    b.set_weights(c.weights)
    back = b.get_weights()
    assert set(back) == set(c.weights)
    for name, value in c.weights.items():
        assert back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), f"{name} changed on the way in and out"
    got = b.forward(c.x)
    assert got[0].shape == c.expected[0].shape
    np.testing.assert_allclose(got[0], c.expected[0], rtol=RTOL, atol=ATOL)
