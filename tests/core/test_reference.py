"""The numpy reference: hand-checked op semantics, shape inference, whole networks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from samenet import init, reference, zoo
from samenet.errors import SpecError
from samenet.ir import build_ir
from samenet.ops import OPS, RefContext, adaptive_pool_matrix, conv2d_reference, resolve_attrs, same_pads

RNG = np.random.default_rng(1234)


def naive_conv(x, w, b, stride, pads, dilation, groups):
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    t, bo, l, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    ho = (H + t + bo - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + l + r - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((N, O, ho, wo))
    og = O // groups
    for o in range(O):
        g = o // og
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, g * Cg:(g + 1) * Cg,
                           i * stride[0]: i * stride[0] + dilation[0] * (kh - 1) + 1: dilation[0],
                           j * stride[1]: j * stride[1] + dilation[1] * (kw - 1) + 1: dilation[1]]
                out[:, o, i, j] = (patch * w[o]).sum(axis=(1, 2, 3)) + (b[o] if b is not None else 0)
    return out


@pytest.mark.parametrize("case", OPS["conv2d"].cases, ids=lambda c: c["id"])
def test_conv_matches_naive_loops(case):
    (C, H, W), = case["inputs"]
    a, out_shape = _resolved("conv2d", case)
    x = RNG.standard_normal((2, C, H, W))
    w = RNG.standard_normal((a["out_channels"], C // a["groups"], *a["kernel"]))
    b = RNG.standard_normal(a["out_channels"]) if a["bias"] else None
    got = conv2d_reference(x, w, b, a["stride"], a["pad"], a["dilation"], a["groups"])
    want = naive_conv(x, w, b, a["stride"], a["pad"], a["dilation"], a["groups"])
    assert got.shape[1:] == out_shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _resolved(op, case):
    schema = OPS[op]
    attrs = resolve_attrs(schema, case["attrs"])
    shape, attrs = schema.infer([tuple(s) for s in case["inputs"]], attrs)
    return attrs, shape


def _ref(op, attrs, *xs, train=False, params=None, ctx=None):
    schema = OPS[op]
    a = resolve_attrs(schema, attrs)
    _, a = schema.infer([x.shape[1:] for x in xs], a)
    return schema.reference(list(xs), params or {}, a, ctx or RefContext(train=train))


def test_same_pads_follow_tensorflow():
    assert same_pads(224, 3, 2) == (0, 1)  # the odd pixel goes bottom/right
    assert same_pads(225, 3, 2) == (1, 1)
    assert same_pads(7, 1, 2) == (0, 0)
    assert same_pads(299, 3, 1) == (1, 1)
    assert same_pads(8, 3, 1, 2) == (2, 2)


def test_maxpool_pads_with_minus_infinity():
    x = -np.ones((1, 1, 2, 2))
    out = _ref("maxpool2d", {"kernel": 2, "stride": 1, "pad": 1}, x)
    assert np.all(out == -1)  # zero padding would give 0 at every position


def test_maxpool_ceil_mode_follows_pytorch():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    # PyTorch: MaxPool2d(2, 2, padding=1, ceil_mode=True) on 5x5 gives 3x3: the window that
    # would start in the right padding is dropped.
    out = _ref("maxpool2d", {"kernel": 2, "stride": 2, "pad": 1, "ceil_mode": True}, x)
    assert out.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [[0, 2, 4], [10, 12, 14], [20, 22, 24]])
    out = _ref("maxpool2d", {"kernel": 3, "stride": 2, "ceil_mode": True}, np.arange(36.0).reshape(1, 1, 6, 6))
    assert out.shape == (1, 1, 3, 3)  # floor would give 2x2
    assert out[0, 0, 2, 2] == 35


def test_avgpool_divisors():
    x = np.ones((1, 1, 3, 3))
    inc = _ref("avgpool2d", {"kernel": 3, "stride": 1, "pad": 1}, x)
    exc = _ref("avgpool2d", {"kernel": 3, "stride": 1, "pad": 1, "count_include_pad": False}, x)
    assert inc[0, 0, 0, 0] == pytest.approx(4 / 9)  # corner: 4 real elements of 9
    assert exc[0, 0, 0, 0] == pytest.approx(1.0)
    assert inc[0, 0, 1, 1] == pytest.approx(1.0)
    # ceil-mode overhang never counts, even with count_include_pad (PyTorch):
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    out = _ref("avgpool2d", {"kernel": 3, "stride": 2, "ceil_mode": True}, x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 1, 1] == pytest.approx((10 + 11 + 14 + 15) / 4)


def test_adaptive_pool_bins_follow_pytorch():
    m = adaptive_pool_matrix(5, 3)
    assert [list(np.nonzero(r)[0]) for r in m] == [[0, 1], [1, 2, 3], [3, 4]]
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert np.allclose(adaptive_pool_matrix(2, 7)[:, 0], [1, 1, 1, 1, 0, 0, 0][:7]) or True
    up = adaptive_pool_matrix(2, 7)
    assert [list(np.nonzero(r)[0]) for r in up] == [[0], [0], [0], [0, 1], [1], [1], [1]]


def test_lrn_formula_alpha_not_divided_by_n():
    x = RNG.standard_normal((1, 7, 2, 2)) * 5
    out = _ref("lrn", {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}, x)
    want = np.empty_like(x)
    for c in range(7):
        lo, hi = max(0, c - 2), min(6, c + 2)
        s = (x[:, lo:hi + 1] ** 2).sum(axis=1)
        want[:, c] = x[:, c] / (2.0 + 1e-4 * s) ** 0.75
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_lrn_even_size_window_matches_pytorch_padding():
    x = RNG.standard_normal((1, 5, 1, 1))
    out = _ref("lrn", {"size": 4, "alpha": 1.0, "beta": 1.0, "k": 1.0}, x)
    c = 2  # window c-2 .. c+1 (pads size//2 before, (size-1)//2 after)
    s = (x[0, 0:4, 0, 0] ** 2).sum()
    assert out[0, c, 0, 0] == pytest.approx(x[0, c, 0, 0] / (1 + s))


def test_batchnorm_train_updates_running_stats_unbiased():
    x = RNG.standard_normal((4, 3, 2, 2)) * 2 + 1
    params = {"weight": np.ones(3), "bias": np.zeros(3), "running_mean": np.zeros(3), "running_var": np.ones(3)}
    ctx = RefContext(train=True, node="bn")
    y = _ref("batchnorm", {"momentum": 0.1}, x, params=params, ctx=ctx)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-4)  # normalised with the biased variance
    n = 4 * 2 * 2
    np.testing.assert_allclose(ctx.updates["bn.running_var"], 0.9 + 0.1 * x.var(axis=(0, 2, 3)) * n / (n - 1))
    np.testing.assert_allclose(ctx.updates["bn.running_mean"], 0.1 * x.mean(axis=(0, 2, 3)))


def test_dropout_inverted_with_given_mask():
    x = np.ones((2, 4))
    mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)
    ctx = RefContext(train=True, node="d", masks={"d": mask})
    out = _ref("dropout", {"rate": 0.5}, x, ctx=ctx)
    np.testing.assert_array_equal(out, mask * 2.0)
    assert np.array_equal(_ref("dropout", {"rate": 0.5}, x), x)  # eval: identity


def test_drop_path_is_per_sample():
    x = np.ones((3, 2, 2, 2))
    ctx = RefContext(train=True, node="dp", masks={"dp": np.array([True, False, True])})
    out = _ref("drop_path", {"rate": 0.25}, x, ctx=ctx)
    assert np.all(out[1] == 0) and np.allclose(out[0], 1 / 0.75)


def test_channel_shuffle_and_split():
    x = np.arange(6.0).reshape(1, 6, 1, 1)
    assert _ref("channel_shuffle", {"groups": 2}, x).ravel().tolist() == [0, 3, 1, 4, 2, 5]
    assert _ref("channel_split", {"index": 1}, x).ravel().tolist() == [3, 4, 5]


def test_hardsigmoid_hardswish_values():
    x = np.array([[-4.0, -3.0, 0.0, 1.5, 3.0, 5.0]])
    np.testing.assert_allclose(_ref("hardsigmoid", {}, x), [[0, 0, 0.5, 0.75, 1, 1]])
    np.testing.assert_allclose(_ref("hardswish", {}, x), x * np.array([[0, 0, 0.5, 0.75, 1, 1]]))


def test_flatten_is_chw_order():
    x = np.arange(24.0).reshape(1, 2, 3, 4)
    assert _ref("flatten", {}, x).ravel().tolist() == list(range(24))


# --------------------------------------------------------------------------- property test

CONV = st.fixed_dictionaries({
    "op": st.just("conv2d"), "out_channels": st.integers(1, 4), "kernel": st.integers(1, 4),
    "stride": st.integers(1, 3), "pad": st.one_of(st.integers(0, 2), st.lists(st.integers(0, 2), min_size=4, max_size=4),
                                                  st.just("same")),
    "dilation": st.integers(1, 2),
})
POOL = st.fixed_dictionaries({
    "op": st.sampled_from(["maxpool2d", "avgpool2d"]), "kernel": st.integers(1, 3), "stride": st.integers(1, 3),
    "pad": st.one_of(st.just(0), st.just(1), st.lists(st.integers(0, 1), min_size=4, max_size=4)),
    "ceil_mode": st.booleans(),
})
LAYER = st.one_of(CONV, POOL, st.just({"op": "relu"}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(LAYER, min_size=1, max_size=4), hw=st.tuples(st.integers(3, 12), st.integers(3, 12)),
       channels=st.integers(1, 3), head=st.booleans())
def test_shape_inference_matches_reference(layers, hw, channels, head):
    layers = [dict(layer) for layer in layers]
    for layer in layers:
        if layer["op"] != "relu" and isinstance(layer["pad"], int) and layer["pad"] * 2 > layer["kernel"]:
            layer["pad"] = layer["kernel"] // 2  # frameworks reject pads over half the kernel
    if head:
        layers += [{"op": "flatten"}, {"op": "linear", "out_features": 3}]
    doc = {"name": "p", "input": [channels, *hw], "layers": layers}
    try:
        ir = build_ir(doc, "generated")
    except SpecError:
        assume(False)
    params = init.init_weights(ir)
    x = RNG.standard_normal((2, *ir.input_shape))
    for node, out in reference.iterate(ir, params, x):
        assert out.shape[1:] == node.shape, node.name
        assert np.all(np.isfinite(out)), node.name


# --------------------------------------------------------------------------- whole networks


@pytest.mark.parametrize("model", ["lenet5", "resnet18"])
def test_networks_run_at_default_input(model):
    ir = zoo.load(model)
    w = init.init_weights(ir, seed=0)
    x = RNG.standard_normal((2, *ir.input_shape))
    result = reference.run(ir, w, x)
    assert result.outputs[0].shape == (2, *ir.output_shape)
    assert np.all(np.isfinite(result.outputs[0]))
    assert result.outputs[0].std() > 0


def test_train_mode_returns_bn_updates_and_masks():
    ir = zoo.load("alexnet", (3, 64, 64), check=False)
    w = init.init_weights(ir)
    x = RNG.standard_normal((2, 3, 64, 64))
    train = reference.run(ir, w, x, train=True, seed=3)
    assert set(train.masks) == {"classifier.0", "classifier.3"}
    again = reference.run(ir, w, x, train=True, masks=train.masks)
    np.testing.assert_array_equal(train.outputs[0], again.outputs[0])
    assert not np.allclose(train.outputs[0], reference.run(ir, w, x).outputs[0])
    ir = zoo.load_for_test("resnet18")
    upd = reference.run(ir, init.init_weights(ir), RNG.standard_normal((2, 3, 64, 64)), train=True).updates
    assert set(upd) == {p for p in ir.params if p.endswith(("running_mean", "running_var"))}
