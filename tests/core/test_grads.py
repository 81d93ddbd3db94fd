"""The training oracle: every op's backward against central finite differences, and whole steps."""

from __future__ import annotations

import numpy as np
import pytest

from samenet import conformance, grads, init, probe, reference, zoo
from samenet.backend import Optimizer
from samenet.ops import OPS, RefContext

CASES = conformance.op_case_ids()


def test_every_op_has_a_backward():
    assert grads.missing_backward() == []


def _loss_and_grads(ir, params, x, masks, r):
    """L = sum(out * r) in train mode, and its gradients."""
    ctx = RefContext(train=True, masks=dict(masks))
    acts = {n.name: o for n, o in reference.iterate(ir, params, x, ctx, keep=True)}
    out = acts[ir.outputs[0].node]
    return float((out * r).sum()), acts


@pytest.mark.parametrize("test_id, op, case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_finite_differences(test_id, op, case):
    ir = conformance.op_case_ir(op, case)
    rng = np.random.default_rng(7)
    params = {k: v.astype(np.float64) for k, v in probe.probe_weights(ir, 0, batch_size=4).items()}
    x = rng.standard_normal((2, *ir.input_shape)) * case.get("scale", 1.0) + case.get("shift", 0.0)
    out_shape = (2, *ir.output_shape)
    r = rng.standard_normal(out_shape)
    masks = {n.name: rng.random((2, *n.shape) if n.op == "dropout" else (2,)) >= n.attrs["rate"]
             for n in ir.nodes if n.op in ("dropout", "drop_path") and n.attrs["rate"]}
    # analytic: treat r as the gradient of the output
    ctx = RefContext(train=True, masks=dict(masks))
    acts = {n.name: o for n, o in reference.iterate(ir, params, x, ctx, keep=True)}
    dacts = {ir.outputs[0].node: r}
    pgrads = {}
    for node in reversed(ir.nodes):
        if node.op == "input" or node.name not in dacts:
            continue
        local = {n.rsplit(".", 1)[1]: params[n] for n in node.params}
        ctx.node = node.name
        dxs, dps = OPS[node.op].backward([acts[s] for s in node.inputs], local, node.attrs, acts[node.name],
                                            dacts.pop(node.name), ctx)
        for s, dx in zip(node.inputs, dxs):
            dacts[s] = dacts.get(s, 0) + dx
        pgrads.update({f"{node.name}.{k}": v for k, v in dps.items()})
    dx_analytic = dacts["input"]
    # numeric, at a few random coordinates of the input and of every trainable parameter
    eps = 1e-6

    def loss_at(px, pp):
        return _loss_and_grads(ir, pp, px, masks, r)[0]

    for _ in range(6):
        idx = tuple(rng.integers(0, s) for s in x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num = (loss_at(xp, params) - loss_at(xm, params)) / (2 * eps)
        assert dx_analytic[idx] == pytest.approx(num, rel=1e-4, abs=1e-6), f"d input{idx}"
    for name, p in ir.params.items():
        if not p.trainable:
            continue
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            pp, pm = dict(params), dict(params)
            pp[name], pm[name] = params[name].copy(), params[name].copy()
            pp[name][idx] += eps
            pm[name][idx] -= eps
            num = (loss_at(x, pp) - loss_at(x, pm)) / (2 * eps)
            assert pgrads[name][idx] == pytest.approx(num, rel=1e-4, abs=1e-6), f"d {name}{idx}"


def test_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((3, 5)), np.array([0, 4, 2])
    loss, g = grads.cross_entropy(z, y)
    for i, j in [(0, 0), (1, 3), (2, 2)]:
        zp, zm = z.copy(), z.copy()
        zp[i, j] += 1e-6
        zm[i, j] -= 1e-6
        assert g[i, j] == pytest.approx((grads.cross_entropy(zp, y)[0] - grads.cross_entropy(zm, y)[0]) / 2e-6, rel=1e-5)


def test_sgd_update_follows_the_written_rule():
    ir = zoo.load("lenet5")
    w = {k: v.astype(np.float64) for k, v in init.init_weights(ir).items()}
    g = {k: np.ones_like(v) for k, v in w.items()}
    opt = Optimizer(lr=0.1, momentum=0.9, weight_decay=0.01)
    w1, v1 = grads.sgd_update(ir, w, g, {}, opt)
    name = "fc1.weight"
    np.testing.assert_allclose(v1[name], 1 + 0.01 * w[name])
    np.testing.assert_allclose(w1[name], w[name] - 0.1 * (1 + 0.01 * w[name]))
    w2, v2 = grads.sgd_update(ir, w1, g, {}, opt, v1)
    np.testing.assert_allclose(v2[name], 0.9 * v1[name] + 1 + 0.01 * w1[name])


def test_train_step_on_a_network_with_aux_heads_and_dropout():
    ir = zoo.load_for_test("googlenet_aux")
    w = probe.probe_weights(ir, 0, batch_size=4)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, *ir.input_shape)), rng.integers(0, 1000, 2)
    step = grads.train_step(ir, w, x, y, Optimizer(lr=0.1))
    assert np.isfinite(step.loss) and step.loss > 0
    assert {n.name for n in ir.nodes if n.op == "dropout" and n.attrs["rate"]} <= set(step.masks)
    assert any(k.startswith("aux1.") for k in step.grads)  # the auxiliary heads get gradients
    changed = [k for k in ir.params if not np.allclose(step.weights[k], w[k])]
    assert len(changed) == len(ir.params)  # every weight moved, BN statistics included
