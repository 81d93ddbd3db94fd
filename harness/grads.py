"""numpy backward pass of the op table and the training-step oracle.

The oracle of training parity (issue: proof of identity) is this module, not a framework:
a float64 forward in train semantics keeping every activation, the mean cross-entropy loss
(plus weighted auxiliary heads), the backward pass of every op, and the written update rule
of samenet.backend (L2 weight decay in the gradient, PyTorch-form momentum). Each op's
backward is its schema's (``OpSchema.backward`` in samenet.ops), checked against central
finite differences in the core tests for every conformance case of the op table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from .ops import INPUT_OP, OPS, RefContext
from .reference import iterate, run

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
        if node.op == INPUT_OP or node.name not in dacts:
            continue
        local = {n.rsplit(".", 1)[1]: np.asarray(params[n], dtype=dtype) for n in node.params}
        ctx.node = node.name
        xs = [acts[s] for s in node.inputs]
        dxs, dps = OPS[node.op].backward(xs, local, node.attrs, acts[node.name], dacts.pop(node.name), ctx)
        for src, dx in zip(node.inputs, dxs):
            dacts[src] = dacts[src] + dx if src in dacts else dx
        for local_name, g in dps.items():
            grads[f"{node.name}.{local_name}"] = g
    return loss, grads, ctx.updates, ctx.masks


def loss_at(ir, params, x, y, masks=None, bn_unbiased=True, dtype=np.float64) -> float:
    """The training loss (train-mode forward, given masks) at some weights."""
    result = run(ir, params, x, train=True, masks=masks, dtype=dtype)
    return sum(o.weight * cross_entropy(out, y)[0] for o, out in zip(ir.outputs, result.outputs))


def sgd_update(ir, params, grads, updates, optimizer, momentum=None, dtype=np.float64):
    """The written update rule (samenet.backend): L2 in the gradient, PyTorch-form momentum."""
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
    """Ops a spec may use that have no backward (none: a core test checks)."""
    return sorted(name for name, op in OPS.items() if op.backward is None and "internal" not in op.traits)
