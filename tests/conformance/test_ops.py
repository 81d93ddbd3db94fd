"""Every op of the op table, alone, with its edge attributes, against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from samenet.backend import BuildConfig
from samenet.conformance import ATOL, RTOL, op_case, op_case_ids

CASES = op_case_ids()


@pytest.mark.parametrize("test_id, op, case", CASES, ids=[c[0] for c in CASES])
def test_op_forward_matches_reference(backend_name, new_backend, known_gap, test_id, op, case):
    known_gap(test_id)
    c = op_case(op, case)
    b = new_backend()
    b.build(c.ir, BuildConfig())
    b.set_weights(c.weights)
    got = b.forward(c.x)
    assert len(got) == 1
    assert got[0].shape == c.expected[0].shape
    np.testing.assert_allclose(got[0], c.expected[0], rtol=RTOL, atol=ATOL)
    assert b.param_counts() == (c.ir.trainable_params, c.ir.non_trainable_params)
