"""The IR as Gluon: a :class:`Program` (node functions and the Parameters they read) and the
:class:`Graph` HybridBlock that runs it in one mode.

Two graphs share the program's Gluon Parameters: the eval graph (main output) and the train
graph (loss, main output, auxiliary outputs: the loss is part of the graph, so a hybridized
train step is one cached op plus the update). Both walk samenet.graph's schedule of their
mode (IR order, each value released after its last reader).
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
from mxnet import gluon

from samenet.graph import layer_names, missing_builders, schedules
from samenet.ops import ops_with

from .builders import BUILDERS, MXNetBuildContext

_TRAIN_ONLY_OPS = ops_with("train_only")
"""dropout, drop_path: the identity in eval mode (the eval graph passes their input through)."""


class Program:
    """The IR compiled to node functions plus the Gluon Parameters they read.

    Attributes:
        params: Canonical parameter name -> gluon Parameter (the IR's parameter table).
        pdict: The gluon ParameterDict holding those and the graph's constants (divisor
            maps, gluon Constants, never counted as parameters).
        schedules: samenet.graph's schedule per mode (``train`` -> Schedule).
        plans: Per mode, one tuple per step, ``(slot, fn, inputs, keys, free)``: fn is None
            for a pass-through (a train-only op in eval mode); keys are (local name, block
            key) of the parameters and constants fn reads.
        slots: Node name -> slot (position in ``ir.nodes``, the graphs' value list).
        mask_nodes: Nodes (IR order) of the ops that draw keep-masks (set_masks).
    """

    def __init__(self, ir, config, device, dtype: str = "float32"):
        self.ir = ir
        self.pdict = gluon.ParameterDict(prefix="samenet_")
        self.params: dict[str, Any] = {}
        missing_builders(ir, BUILDERS, "mxnet")
        self.schedules = schedules(ir)
        self.slots = {n.name: i for i, n in enumerate(ir.nodes)}
        names = layer_names(ir, "mxnet")
        build_ctx = MXNetBuildContext(ir, config, dtype=dtype, slots=self.slots)
        compiled = {}  # slot -> (fn, keys)
        for step in self.schedules[True].steps:
            node = ir.nodes[step.index]
            fn, consts = BUILDERS[node.op](node, build_ctx)
            keys = self._add_params(node, names[node.name], dtype)
            keys += self._add_consts(consts, names[node.name], dtype)
            compiled[step.index] = (fn, tuple(keys))
        self.pdict.initialize(ctx=device)
        self.plans = {train: self._plan(compiled, train) for train in (False, True)}
        stochastic = ops_with("stochastic")
        self.mask_nodes = [n for n in ir.nodes if n.op in stochastic]

    def _add_params(self, node, layer: str, dtype: str) -> list[tuple[str, str]]:
        keys = []
        for full in node.params:
            p = self.ir.params[full]
            key = f"{layer}__{p.local}"
            self.params[full] = self.pdict.get(key, shape=tuple(p.shape), dtype=dtype, init=mx.init.Zero(),
                                               grad_req="write" if p.trainable else "null",
                                               differentiable=p.trainable, allow_deferred_init=False)
            keys.append((p.local, key))
        return keys

    def _add_consts(self, consts: dict, layer: str, dtype: str) -> list[tuple[str, str]]:
        keys = []
        for local, value in consts.items():
            key = f"{layer}__{local}"
            self.pdict.get_constant(key, mx.nd.array(value, dtype=dtype))
            keys.append((local, key))
        return keys

    def _plan(self, compiled, train: bool) -> tuple:
        plan = []
        for step in self.schedules[train].steps:
            fn, keys = compiled[step.index]
            if not train and self.ir.nodes[step.index].op in _TRAIN_ONLY_OPS:
                fn, keys = None, ()
            plan.append((step.index, fn, step.inputs, keys, step.free))
        return tuple(plan)


class Graph(gluon.HybridBlock):
    """Runs the program in one mode; eval graph -> main output, train graph -> (loss, main, *aux).

    Inputs: x, and for the train graph y (float class indices) then the fixed keep-masks
    (already scaled by 1 / (1 - rate)) of the slots given to ``set_mask_order``.
    """

    def __init__(self, program: Program, train: bool):
        super().__init__(prefix="samenet_", params=program.pdict)
        schedule = program.schedules[train]
        self._train = train
        self._plan = program.plans[train]
        self._size, self._main, self._aux = schedule.size, schedule.main, schedule.aux
        self._mask_order: list[int] = []
        for _, _, _, keys, _ in self._plan:
            for _, key in keys:
                self._reg_params[key] = self.params.get(key)

    def set_mask_order(self, order: list[int]) -> None:
        """The slots whose fixed masks follow y among the inputs (a change re-traces)."""
        if order != self._mask_order:
            self._mask_order = list(order)
            self._clear_cached_op()

    def hybrid_forward(self, F, x, *args, **P):
        masks = dict(zip(self._mask_order, args[1:])) if self._train else None
        vals: list = [None] * self._size
        vals[0] = x
        for slot, fn, inputs, keys, free in self._plan:
            if fn is None:
                vals[slot] = vals[inputs[0]]
            else:
                vals[slot] = fn(F, [vals[j] for j in inputs], {k: P[v] for k, v in keys}, masks)
            for j in free:
                vals[j] = None
        main = vals[self._main]
        if main is x:  # a graph output must not be its input variable
            main = F.identity(main)
        if not self._train:
            return main
        y = args[0]
        loss = cross_entropy(F, main, y)
        aux = [vals[j] for j, _ in self._aux]
        for out, (_, w) in zip(aux, self._aux):
            loss = loss + w * cross_entropy(F, out, y)
        return (loss, main, *aux)


def cross_entropy(F, logits, y):
    """Mean softmax cross-entropy from logits; y holds class indices (float)."""
    return -F.mean(F.pick(F.log_softmax(logits, axis=1), y, axis=1))
