"""Seeded canonical weights and the weights file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samenet import init, probe, zoo
from samenet.errors import SpecError
from samenet.init import check_initializer, draw, stream


def test_same_seed_same_bytes_other_seed_differs():
    ir = zoo.load("resnet18")
    a, b, c = init.init_weights(ir, 0), init.init_weights(ir, 0), init.init_weights(ir, 1)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    assert all(v.dtype == np.float32 for v in a.values())


def test_streams_depend_on_name_not_order():
    x = draw(check_initializer({"kind": "normal", "std": 1.0}), (5,), 1, 1, stream(7, "layer.weight"))
    y = draw(check_initializer({"kind": "normal", "std": 1.0}), (5,), 1, 1, stream(7, "layer.weight"))
    np.testing.assert_array_equal(x, y)


def test_known_bytes_are_stable():
    # Box-Muller over PCG64 uniforms, pinned: the same under numpy 1.23 (MXNet's env) and 2.x.
    x = draw(check_initializer({"kind": "normal", "std": 1.0}), (3,), 1, 1, stream(0, "w"))
    u = draw(check_initializer({"kind": "uniform", "low": 0, "high": 1}), (2,), 1, 1, stream(0, "w"))
    np.testing.assert_allclose(x, [-1.7421279965784777, 0.07992800486717584, 0.07688174136689807], rtol=1e-15)
    np.testing.assert_allclose(u, [0.7813887803008482, 0.5856021309028017], rtol=1e-15)


@pytest.mark.parametrize("spec, shape, fans, std", [
    ({"kind": "kaiming_normal", "mode": "fan_out", "nonlinearity": "relu"}, (64, 32, 3, 3), (288, 576), math.sqrt(2 / 576)),
    ({"kind": "kaiming_uniform", "a": math.sqrt(5)}, (64, 288), (288, 64), 1 / math.sqrt(288) / math.sqrt(3)),
    ({"kind": "glorot_uniform"}, (100, 200), (200, 100), math.sqrt(2 / 300)),
    ({"kind": "normal", "std": 0.01}, (200, 200), (1, 1), 0.01),
    ({"kind": "truncated_normal", "std": 1.0}, (100000,), (1, 1), 0.8796),
    ({"kind": "variance_scaling", "scale": 2.0, "mode": "fan_in"}, (100, 300), (300, 100), math.sqrt(2 / 300)),
])
def test_initializer_statistics(spec, shape, fans, std):
    x = draw(check_initializer(spec), shape, *fans, stream(0, "p"))
    assert x.shape == shape
    assert x.std() == pytest.approx(std, rel=0.05)
    assert abs(x.mean()) < 4 * std / math.sqrt(x.size) + 1e-9


def test_truncated_normal_bounds():
    x = draw(check_initializer({"kind": "truncated_normal", "std": 0.1, "a": -0.15, "b": 0.15}), (10000,), 1, 1, stream(0, "t"))
    assert x.min() >= -0.15 and x.max() <= 0.15


@pytest.mark.parametrize("bad, reason", [
    ("xavier_magic", "unknown initializer"),
    ({"kind": "normal"}, "needs argument 'std'"),
    ({"kind": "normal", "std": "big"}, "must be a finite number"),
    ({"kind": "kaiming_normal", "mode": "sideways"}, "must be one of"),
    ({"kind": "zeros", "value": 1}, "has no argument 'value'"),
    (3, "an initializer is a kind name"),
])
def test_bad_initializers(bad, reason):
    with pytest.raises(SpecError, match=reason):
        check_initializer(bad)


def test_weights_file_round_trip(tmp_path):
    ir = zoo.load("lenet5")
    w = init.init_weights(ir, 3)
    path = init.save_weights(tmp_path / "w.npz", w)
    back = init.load_weights(path, ir)
    assert all(back[k].tobytes() == w[k].tobytes() for k in w)


def test_weights_file_refuses_pickles_and_mismatches(tmp_path):
    ir = zoo.load("lenet5")
    np.savez(tmp_path / "obj.npz", **{"conv1.weight": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        init.load_weights(tmp_path / "obj.npz")
    w = init.init_weights(ir)
    w["conv1.weight"] = w["conv1.weight"][:3]
    init.save_weights(tmp_path / "bad.npz", w)
    with pytest.raises(SpecError, match="conv1.weight has shape"):
        init.load_weights(tmp_path / "bad.npz", ir)
    del w["fc3.bias"]
    init.save_weights(tmp_path / "missing.npz", w)
    with pytest.raises(SpecError, match="missing \\['fc3.bias'\\]"):
        init.load_weights(tmp_path / "missing.npz", ir)


def test_probe_weights_keep_activations_near_unit_scale():
    from samenet import reference

    ir = zoo.load_for_test("resnet50")
    w = probe.probe_weights(ir, 0)
    x = np.random.default_rng(5).standard_normal((2, *ir.input_shape))
    out = reference.run(ir, w, x).outputs[0]
    assert 0.5 < out.std() < 2
    biases = [w[p] for p in ir.params if p.endswith(".bias")]
    assert all(np.abs(b).max() > 0 for b in biases)  # nothing left at a default zero
    bn_var = w["layer1.0.bn1.running_var"]
    assert not np.allclose(bn_var, 1.0)
