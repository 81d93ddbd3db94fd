"""numpy backward pass of the op table and the training-step oracle.

The oracle of training parity (issue: proof of identity) is this module, not a framework:
a float64 forward in train semantics keeping every activation, the mean cross-entropy loss
(plus weighted auxiliary heads), the backward pass of every op, and the written update rule
of harness.backend (L2 weight decay in the gradient, PyTorch-form momentum). Each backward is
checked against central finite differences in the core tests, for every conformance case of
the op table.

``BACKWARD[op](xs, p, a, y, dy, ctx) -> (dxs, dparams)``: ``xs`` the op's inputs, ``p`` its
parameters by local name, ``a`` its attributes, ``y`` its output, ``dy`` the gradient of the
loss with respect to ``y``; returns one gradient per input and per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .ops import OPS, RefContext, _pool_pad, _sigmoid, _windows, adaptive_pool_matrix, avgpool_divisor

# --------------------------------------------------------------------------- kernels


def conv2d_backward(x, w, dy, stride, pads, dilation, groups):
    """Gradients (dx, dw) of conv2d_reference, by kernel taps as batched matmuls."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    t, b, l, r = pads
    (sh, sw), (dh, dw_) = stride, dilation
    Ho, Wo = dy.shape[2:]
    G, Og = groups, O // groups
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    dy_g = dy.reshape(N, G, Og, Ho * Wo).transpose(1, 2, 0, 3).reshape(G, Og, N * Ho * Wo)
    w_g = w.reshape(G, Og, Cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            hs, ws = slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh), slice(j * dw_, j * dw_ + sw * (Wo - 1) + 1, sw)
            xs = xp[:, :, hs, ws].reshape(N, G, Cg, Ho * Wo).transpose(1, 0, 3, 2).reshape(G, N * Ho * Wo, Cg)
            dw[:, :, i, j] = (dy_g @ xs).reshape(O, Cg)
            dxs = w_g[:, :, :, i, j].transpose(0, 2, 1) @ dy_g  # G, Cg, N*Ho*Wo
            dxp[:, :, hs, ws] += dxs.reshape(G, Cg, N, Ho, Wo).transpose(2, 0, 1, 3, 4).reshape(N, C, Ho, Wo)
    return dxp[:, :, t : t + H, l : l + W], dw


def _unbroadcast(g, shape):
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


# --------------------------------------------------------------------------- per op


def _conv(xs, p, a, y, dy, ctx):
    dx, dw = conv2d_backward(xs[0], p["weight"], dy, a["stride"], a["pad"], a["dilation"], a["groups"])
    dp = {"weight": dw}
    if "bias" in p:
        dp["bias"] = dy.sum(axis=(0, 2, 3))
    return [dx], dp


def _linear(xs, p, a, y, dy, ctx):
    dp = {"weight": dy.T @ xs[0]}
    if "bias" in p:
        dp["bias"] = dy.sum(axis=0)
    return [dy @ p["weight"]], dp


def _batchnorm(xs, p, a, y, dy, ctx):
    x = xs[0]
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    gamma = p["weight"].reshape(shape) if "weight" in p else 1.0
    if ctx.train:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = p["running_mean"], p["running_var"]
    inv = 1.0 / np.sqrt(var.reshape(shape) + a["eps"])
    xhat = (x - mean.reshape(shape)) * inv
    dp = {}
    if "weight" in p:
        dp["weight"] = (dy * xhat).sum(axis=axes)
    if "bias" in p:
        dp["bias"] = dy.sum(axis=axes)
    dxhat = dy * gamma
    if ctx.train:
        m = x.size / x.shape[1]
        dx = inv / m * (m * dxhat - dxhat.sum(axis=axes, keepdims=True)
                        - xhat * (dxhat * xhat).sum(axis=axes, keepdims=True))
    else:
        dx = dxhat * inv
    return [dx], dp


def _elementwise(derivative: Callable):
    return lambda xs, p, a, y, dy, ctx: ([dy * derivative(xs[0], y, a)], {})


def _softmax(xs, p, a, y, dy, ctx):
    return [y * (dy - (dy * y).sum(axis=1, keepdims=True))], {}


def _maxpool(xs, p, a, y, dy, ctx):
    x = xs[0]
    N, C, H, W = x.shape
    out_hw = dy.shape[2:]
    xp = _pool_pad(x, a, out_hw, -np.inf)
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    flat = _windows(xp, (kh, kw), (sh, sw), (1, 1), out_hw).reshape(N, C, *out_hw, kh * kw)
    idx = flat.argmax(axis=-1)
    for node, n_, c_, i_, j_ in ctx.flips:  # near-ties resolved the other way (see harness.conformance)
        if node == ctx.node:
            idx[n_, c_, i_, j_] = int(np.argsort(flat[n_, c_, i_, j_], kind="stable")[-2])
    rows = np.arange(out_hw[0])[:, None] * sh + idx // kw
    cols = np.arange(out_hw[1])[None, :] * sw + idx % kw
    n = np.arange(N)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    dxp = np.zeros_like(xp)
    np.add.at(dxp, (n, c, rows, cols), dy)
    t, _, l, _ = a["pad"]
    return [dxp[:, :, t : t + H, l : l + W]], {}


def _avgpool(xs, p, a, y, dy, ctx):
    x = xs[0]
    H, W = x.shape[2:]
    out_hw = dy.shape[2:]
    g = dy / avgpool_divisor((H, W), a, out_hw)
    dxp = np.zeros_like(_pool_pad(x, a, out_hw, 0.0))
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + sh * (out_hw[0] - 1) + 1 : sh, j : j + sw * (out_hw[1] - 1) + 1 : sw] += g
    t, _, l, _ = a["pad"]
    return [dxp[:, :, t : t + H, l : l + W]], {}


def _adaptive(xs, p, a, y, dy, ctx):
    H, W = xs[0].shape[2:]
    mh = adaptive_pool_matrix(H, a["output_size"][0])
    mw = adaptive_pool_matrix(W, a["output_size"][1])
    return [np.einsum("ncij,ih,jw->nchw", dy, mh, mw)], {}


def _global_avgpool(xs, p, a, y, dy, ctx):
    H, W = xs[0].shape[2:]
    return [np.broadcast_to(dy / (H * W), xs[0].shape).copy()], {}


def _dropout(xs, p, a, y, dy, ctx):
    if not ctx.train or not a["rate"]:
        return [dy], {}
    mask = np.asarray(ctx.masks[ctx.node], dtype=bool)
    if mask.ndim == 1:  # drop_path: one decision per sample
        mask = mask.reshape((-1,) + (1,) * (dy.ndim - 1))
    return [dy * mask / (1.0 - a["rate"])], {}


def _lrn(xs, p, a, y, dy, ctx):
    x = xs[0]
    n, alpha, beta, k = a["size"], a["alpha"], a["beta"], a["k"]
    before, after = n // 2, (n - 1) // 2
    sq = np.pad(x * x, ((0, 0), (before, after), (0, 0), (0, 0)))
    d = k + alpha * np.lib.stride_tricks.sliding_window_view(sq, n, axis=1).sum(axis=-1)
    # channel j is in the window of channel c for c in [j - after, j + before]
    t = np.pad(dy * x * d ** (-beta - 1), ((0, 0), (after, before), (0, 0), (0, 0)))
    s = np.lib.stride_tricks.sliding_window_view(t, n, axis=1).sum(axis=-1)
    return [dy * d ** (-beta) - 2 * alpha * beta * x * s], {}


def _concat(xs, p, a, y, dy, ctx):
    bounds = np.cumsum([x.shape[1] for x in xs])[:-1]
    return list(np.split(dy, bounds, axis=1)), {}


def _mul(xs, p, a, y, dy, ctx):
    return [_unbroadcast(dy * xs[1], xs[0].shape), _unbroadcast(dy * xs[0], xs[1].shape)], {}


def _shuffle(xs, p, a, y, dy, ctx):
    N, C, H, W = dy.shape
    g = a["groups"]
    return [dy.reshape(N, C // g, g, H, W).transpose(0, 2, 1, 3, 4).reshape(N, C, H, W)], {}


def _split(xs, p, a, y, dy, ctx):
    dx = np.zeros_like(xs[0])
    step = xs[0].shape[1] // a["parts"]
    dx[:, a["index"] * step : (a["index"] + 1) * step] = dy
    return [dx], {}


def _zeropad(xs, p, a, y, dy, ctx):
    t, b, l, r = a["pad"]
    H, W = xs[0].shape[2:]
    return [dy[:, :, t : t + H, l : l + W]], {}


def _hardswish_d(x, y, a):
    return np.where(x <= -3, 0.0, np.where(x >= 3, 1.0, (2 * x + 3) / 6))


BACKWARD: dict[str, Callable] = {
    "conv2d": _conv,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "relu": _elementwise(lambda x, y, a: (x > 0).astype(x.dtype)),
    "relu6": _elementwise(lambda x, y, a: ((x > 0) & (x < 6)).astype(x.dtype)),
    "leaky_relu": _elementwise(lambda x, y, a: np.where(x > 0, 1.0, a["negative_slope"])),
    "sigmoid": _elementwise(lambda x, y, a: y * (1 - y)),
    "tanh": _elementwise(lambda x, y, a: 1 - y * y),
    "hardswish": _elementwise(_hardswish_d),
    "hardsigmoid": _elementwise(lambda x, y, a: ((x > -3) & (x < 3)) / 6.0),
    "silu": _elementwise(lambda x, y, a: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
    "softmax": _softmax,
    "maxpool2d": _maxpool,
    "avgpool2d": _avgpool,
    "adaptive_avgpool2d": _adaptive,
    "global_avgpool": _global_avgpool,
    "flatten": lambda xs, p, a, y, dy, ctx: ([dy.reshape(xs[0].shape)], {}),
    "dropout": _dropout,
    "drop_path": _dropout,
    "lrn": _lrn,
    "concat": _concat,
    "add": lambda xs, p, a, y, dy, ctx: ([dy] * len(xs), {}),
    "mul": _mul,
    "scale": lambda xs, p, a, y, dy, ctx: ([dy * a["factor"]], {}),
    "channel_shuffle": _shuffle,
    "channel_split": _split,
    "identity": lambda xs, p, a, y, dy, ctx: ([dy], {}),
    "zeropad2d": _zeropad,
}

# --------------------------------------------------------------------------- training step


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy from logits and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -logp[np.arange(n), y].mean()
    grad = np.exp(logp)
    grad[np.arange(n), y] -= 1.0
    return float(loss), grad / n


@dataclass
class StepResult:
    """What one oracle training step produced.

    Attributes:
        loss: Loss before the update.
        weights: Every parameter after the step (trainable updated, BN statistics updated).
        momentum: Momentum buffers after the step, by trainable parameter name.
        grads: Gradients of the loss (before weight decay), by trainable parameter name.
        masks: The dropout/drop_path keep-masks used, by node name.
    """

    loss: float
    weights: dict[str, np.ndarray]
    momentum: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def gradients(ir, params, x, y, masks=None, seed=0, dtype=np.float64, bn_unbiased=True, flips=frozenset()):
    """Loss, parameter gradients, BN updates and masks of one train-mode forward/backward."""
    from .reference import iterate

    ctx = RefContext(train=True, masks=dict(masks or {}), rng=np.random.default_rng(seed), bn_unbiased=bn_unbiased,
                     flips=frozenset(flips))
    acts = {}
    for node, out in iterate(ir, params, x, ctx, dtype=dtype, keep=True):
        acts[node.name] = out
    loss, dacts = 0.0, {}
    for o in ir.outputs:
        value, g = cross_entropy(acts[o.node], y)
        loss += o.weight * value
        dacts[o.node] = dacts.get(o.node, 0.0) + o.weight * g
    grads: dict[str, np.ndarray] = {}
    for node in reversed(ir.nodes):
        if node.op == "input" or node.name not in dacts:
            continue
        local = {n.rsplit(".", 1)[1]: np.asarray(params[n], dtype=dtype) for n in node.params}
        ctx.node = node.name
        xs = [acts[s] for s in node.inputs]
        dxs, dps = BACKWARD[node.op](xs, local, node.attrs, acts[node.name], dacts.pop(node.name), ctx)
        for src, dx in zip(node.inputs, dxs):
            dacts[src] = dacts[src] + dx if src in dacts else dx
        for local_name, g in dps.items():
            grads[f"{node.name}.{local_name}"] = g
    return loss, grads, ctx.updates, ctx.masks


def loss_at(ir, params, x, y, masks=None, bn_unbiased=True, dtype=np.float64) -> float:
    """The training loss (train-mode forward, given masks) at some weights."""
    from .reference import run

    result = run(ir, params, x, train=True, masks=masks, dtype=dtype)
    return sum(o.weight * cross_entropy(out, y)[0] for o, out in zip(ir.outputs, result.outputs))


def sgd_update(ir, params, grads, updates, optimizer, momentum=None, dtype=np.float64):
    """The written update rule (harness.backend): L2 in the gradient, PyTorch-form momentum."""
    new, buffers = {}, {}
    momentum = momentum or {}
    for name, p in ir.params.items():
        w = np.asarray(params[name], dtype=dtype)
        if not p.trainable:
            new[name] = np.asarray(updates.get(name, w), dtype=dtype)
            continue
        g = grads[name] + optimizer.weight_decay * w
        v = optimizer.momentum * momentum[name] + g if name in momentum else g
        buffers[name] = v
        new[name] = w - optimizer.lr * v
    return new, buffers


def train_step(ir, params, x, y, optimizer, momentum=None, masks=None, seed=0, dtype=np.float64,
               bn_unbiased=True) -> StepResult:
    """One training step of the contract in harness/backend.py, in numpy."""
    loss, grads, updates, used = gradients(ir, params, x, y, masks, seed, dtype, bn_unbiased)
    weights, buffers = sgd_update(ir, params, grads, updates, optimizer, momentum, dtype)
    return StepResult(loss, weights, buffers, grads, used)


def missing_backward() -> list[str]:
    return sorted(set(OPS) - set(BACKWARD) - {"input"})
