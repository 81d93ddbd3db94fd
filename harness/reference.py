"""numpy reference executor: the oracle every backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .graph import schedule
from .ir import IR, Node
from .ops import OPS, RefContext


@dataclass
class RefResult:
    """Outputs of a reference forward pass.

    Attributes:
        outputs: Main output first; in train mode then each auxiliary output.
        updates: New BN running statistics by parameter name (train mode).
        masks: Dropout/drop_path keep-masks used, by node name (train mode).
    """

    outputs: list[np.ndarray]
    updates: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def iterate(ir: IR, params: dict[str, np.ndarray], x: np.ndarray, ctx: RefContext | None = None,
            hook: Callable[[Node, list, np.ndarray], np.ndarray | None] | None = None,
            dtype=np.float64, keep: bool = False) -> Iterator[tuple[Node, np.ndarray]]:
    """Runs the IR node by node, yielding ``(node, output)``.

    Intermediate outputs are dropped after their last use unless ``keep``.
    ``hook(node, inputs, out)`` may change ``params`` and return None to have the node run again.
    """
    ctx = ctx or RefContext()
    plan = schedule(ir, ctx.train)
    values: list = [None] * plan.size
    entry = ir.nodes[0]
    values[0] = np.asarray(x, dtype=dtype)
    if values[0].shape[1:] != tuple(entry.shape):
        raise ValueError(f"input shape {values[0].shape[1:]} != {entry.shape}")
    yield entry, values[0]
    for step in plan.steps:
        node = ir.nodes[step.index]
        inputs = [values[j] for j in step.inputs]
        out = _run(node, inputs, params, ctx, dtype)
        if hook is not None and hook(node, inputs, out) is None:
            out = _run(node, inputs, params, ctx, dtype)
        values[step.index] = out
        yield node, out
        if not keep:
            for j in step.free:
                values[j] = None


def _run(node: Node, inputs, params, ctx: RefContext, dtype) -> np.ndarray:
    local = {params_name.rsplit(".", 1)[1]: np.asarray(params[params_name], dtype=dtype)
             for params_name in node.params}
    ctx.node = node.name
    return OPS[node.op].reference(inputs, local, node.attrs, ctx)


def run(ir: IR, params: dict[str, np.ndarray], x: np.ndarray, train: bool = False,
        masks: dict | None = None, seed: int = 0, dtype=np.float64) -> RefResult:
    """Forward pass of a whole IR.

    Args:
        ir: The network.
        params: Canonical weights by name.
        x: Input batch (N, C, H, W).
        train: Train semantics (batch statistics, dropout on, auxiliary heads run).
        masks: Keep-masks for dropout/drop_path by node name; missing ones are drawn from
            ``seed`` and returned.
        seed: Seed of masks not given.
        dtype: Compute dtype (float64 by default: the oracle should be more exact than the
            fp32 backends it judges).
    """
    ctx = RefContext(train=train, masks=dict(masks or {}), rng=np.random.default_rng(seed))
    wanted = {o.node for o in ir.outputs if train or not o.train_only}
    found = {}
    for node, out in iterate(ir, params, x, ctx, dtype=dtype):
        if node.name in wanted:
            found[node.name] = out
    outputs = [found[o.node] for o in ir.outputs if o.node in found]
    return RefResult(outputs, ctx.updates, ctx.masks)
