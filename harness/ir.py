"""The IR: a flat, topologically ordered DAG with shapes, parameters and MACs.

Built from an expanded spec (samenet.spec): references resolved, nodes sorted, attributes
checked against the op table, shapes inferred, parameters declared in canonical layout
with their initializers. No framework is involved.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError
from .init import check_initializer
from .ops import INPUT_OP, OPS, fmt_shape, ops_with, resolve_attrs
from .spec import Expansion, RawNode, expand, limit

MACS_TOLERANCE = 0.005


@dataclass(frozen=True)
class Param:
    """One parameter in canonical layout."""

    name: str
    node: str
    local: str
    shape: tuple[int, ...]
    trainable: bool
    init: dict
    fan_in: int
    fan_out: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Node:
    """One op application.

    Attributes:
        name: Unique dotted name.
        op: Op table name.
        inputs: Names of the input nodes.
        attrs: Fully resolved attributes (explicit pads, pairs; no initializers).
        shape: Output shape per sample.
        params: Full names of the node's parameters, in the op's order.
        macs: Multiply-accumulates per sample.
        train_only: Runs in training only (auxiliary heads).
        source: Where the spec defines it.
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict
    shape: tuple[int, ...]
    params: tuple[str, ...]
    macs: int
    train_only: bool
    source: str


@dataclass(frozen=True)
class Output:
    """A model output: the main logits, or an auxiliary head with its loss weight."""

    node: str
    weight: float
    train_only: bool


@dataclass
class IR:
    """A network, framework-neutral.

    Attributes:
        name: Registry name.
        meta: Spec metadata (title, paper, year, reproduces, expect, ...).
        input_shape: Input per sample (C, H, W) this IR was built for.
        nodes: Topologically ordered nodes, ``nodes[0]`` the input.
        params: Parameters by full name, in node order.
        outputs: Main output first, then auxiliary outputs.
        file: The spec file.
    """

    name: str
    meta: dict
    input_shape: tuple[int, ...]
    nodes: list[Node]
    params: dict[str, Param]
    outputs: list[Output]
    file: str
    _by_name: dict[str, Node] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {n.name: n for n in self.nodes}

    def node(self, name: str) -> Node:
        return self._by_name[name]

    @property
    def trainable_params(self) -> int:
        return sum(p.size for p in self.params.values() if p.trainable)

    @property
    def non_trainable_params(self) -> int:
        return sum(p.size for p in self.params.values() if not p.trainable)

    @property
    def macs(self) -> int:
        """Per-sample MACs in eval mode (auxiliary heads off)."""
        return sum(n.macs for n in self.nodes if not n.train_only)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.node(self.outputs[0].node).shape

    def eval_nodes(self) -> list[Node]:
        """Nodes that run in eval mode."""
        return [n for n in self.nodes if not n.train_only]

    def last_use(self, train: bool) -> dict[str, int]:
        """Index of the last node (in ``nodes``) reading each node's output."""
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if train or not n.train_only:
                for src in n.inputs:
                    last[src] = i
        for out in self.outputs:
            last[out.node] = len(self.nodes)
        return last

    def describe(self) -> dict:
        """Canonical, JSON-able description (nodes, params, outputs)."""
        return {
            "input": list(self.input_shape),
            "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "attrs": _jsonable(n.attrs),
                       "shape": list(n.shape), "train_only": n.train_only} for n in self.nodes],
            "params": [{"name": p.name, "shape": list(p.shape), "trainable": p.trainable, "init": p.init}
                       for p in self.params.values()],
            "outputs": [{"node": o.node, "weight": o.weight, "train_only": o.train_only} for o in self.outputs],
        }

    def fingerprint(self) -> str:
        """Hash of the network itself (not of the file's formatting)."""
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _toposort(raw: list[RawNode], file: str) -> list[RawNode]:
    """Stable topological order (definition order among ready nodes); detects cycles."""
    index = {n.name: i for i, n in enumerate(raw)}
    indeg = [len(n.inputs) for n in raw]
    users: list[list[int]] = [[] for _ in raw]
    for i, n in enumerate(raw):
        for src in n.inputs:
            users[index[src]].append(i)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(raw[i])
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(raw):
        stuck = {i for i, d in enumerate(indeg) if d > 0}
        # Walk back along inputs inside the stuck set until a node repeats: that is a cycle.
        i, seen = min(stuck), []
        while i not in seen:
            seen.append(i)
            i = next(index[s] for s in raw[i].inputs if index[s] in stuck)
        members = seen[seen.index(i):][::-1]  # in data-flow order
        first = members.index(min(members))  # start at the earliest-defined node
        members = members[first:] + members[:first]
        cycle = [raw[j].name for j in members]
        node = raw[members[0]]
        raise SpecError(f"cyclic input reference: {' -> '.join(cycle + [cycle[0]])}", file=file, path=node.where())
    return order


def _resolve_refs(raw: list[RawNode], file: str) -> None:
    names = {n.name for n in raw}
    for n in raw:
        if n.refs is None:
            continue
        for ref in n.refs:
            scope, found = n.scope, None
            while True:
                candidate = f"{scope}.{ref}" if scope else ref
                if candidate in names and candidate != n.name:
                    found = candidate
                    break
                if not scope:
                    break
                scope = scope.rpartition(".")[0]
            if found is None:
                raise SpecError(f"input reference '{ref}' matches no node", file=file, path=n.where() + ".inputs")
            n.inputs.append(found)


def build_ir(doc: dict, file: str, input_shape: tuple[int, ...] | None = None,
             overrides: dict | None = None) -> IR:
    """Builds the IR of a checked spec document.

    Args:
        doc: The spec, already schema-checked.
        file: File name for messages.
        input_shape: Input (C, H, W); the spec's default if None.
        overrides: Values for the spec's top-level ``args``.
    """
    expansion: Expansion = expand(doc, file, overrides)
    _resolve_refs(expansion.nodes, file)
    raw = _toposort(expansion.nodes, file)
    shape_in = tuple(input_shape or doc["input"])
    if any(d < 1 for d in shape_in):
        raise SpecError(f"input sizes must be positive, got {list(shape_in)}", file=file, path="$.input")
    schedule = doc.get("drop_path")
    scheduled = ops_with("scheduled_rate")
    drop_nodes = [n.name for n in raw if n.op in scheduled and n.attrs.get("rate") is None]
    shapes: dict[str, tuple[int, ...]] = {}
    nodes: list[Node] = []
    params: dict[str, Param] = {}
    total = 0
    for n in raw:
        op = OPS[n.op]
        if n.op == INPUT_OP:
            shapes[n.name] = shape_in
            nodes.append(Node(n.name, INPUT_OP, (), {}, shape_in, (), 0, False, n.where()))
            continue
        try:
            attrs = resolve_attrs(op, n.attrs)
        except SpecError as e:
            raise SpecError(e.reason, file=file, path=n.path + (e.path or "") +
                            (f" (via {' > '.join(n.chain)})" if n.chain else "")) from None
        if n.op in scheduled and attrs["rate"] is None:
            if schedule is None:
                raise SpecError(f"{n.op} needs a rate, or the spec needs a drop_path schedule", file=file, path=n.where())
            k, count = drop_nodes.index(n.name), len(drop_nodes)
            attrs["rate"] = schedule["start"] + (schedule["end"] - schedule["start"]) * (k / (count - 1) if count > 1 else 0.0)
        init_over = attrs.pop("init", {})
        if op.arity >= 0 and len(n.inputs) != op.arity:
            raise SpecError(f"op {n.op} takes {op.arity} input(s), got {len(n.inputs)}", file=file, path=n.where())
        if op.arity < 0 and len(n.inputs) < 2:
            raise SpecError(f"op {n.op} takes two or more inputs, got {len(n.inputs)}", file=file, path=n.where())
        in_shapes = [shapes[s] for s in n.inputs]
        try:
            shape, attrs = op.infer(in_shapes, attrs)
            if any(d < 1 for d in shape):
                raise SpecError(f"output shape {fmt_shape(shape)} is empty")
            decls = op.params(in_shapes, attrs)
        except SpecError as e:
            raise SpecError(f"{n.op} '{n.name}': {e.reason} (inputs {', '.join(fmt_shape(s) for s in in_shapes)})",
                            file=file, path=n.where()) from None
        known = {d.name for d in decls}
        for pname, spec in init_over.items():
            if pname not in known:
                raise SpecError(f"init for unknown parameter '{pname}' of {n.op} (has: {', '.join(sorted(known)) or 'none'})",
                                file=file, path=n.where() + ".init")
        node_params = []
        for d in decls:
            try:
                init = check_initializer(init_over.get(d.name, n.default_init.get(d.name, d.init)))
            except SpecError as e:
                where = f"{n.where()}.init.{d.name}" if d.name in init_over else f"$.defaults.{n.op}.init.{d.name}"
                raise SpecError(e.reason, file=file, path=where) from None
            full = f"{n.name}.{d.name}"
            total += math.prod(d.shape)
            if total > limit("params"):
                raise SpecError(f"more than {limit('params'):,} parameters by {n.op} '{n.name}' (SAMENET_SPEC_PARAMS)",
                                file=file, path=n.where())
            params[full] = Param(full, n.name, d.name, tuple(d.shape), d.trainable, init, d.fan_in, d.fan_out)
            node_params.append(full)
        shapes[n.name] = tuple(shape)
        macs = op.macs(in_shapes, shape, attrs)
        nodes.append(Node(n.name, n.op, tuple(n.inputs), attrs, tuple(shape), tuple(node_params), int(macs),
                          n.train_only, n.where()))
    outputs = [Output(expansion.output, 1.0, False)] + [Output(name, w, True) for name, w in expansion.aux]
    meta = {k: v for k, v in doc.items() if k not in ("layers", "blocks", "defaults", "args", "$schema")}
    return IR(doc["name"], meta, shape_in, nodes, params, outputs, file)


def check_expected(ir: IR) -> None:
    """Compares the IR's counts with the spec's ``expect`` (params exact, MACs within 0.5%)."""
    expect = ir.meta.get("expect", {})
    if "params" in expect and expect["params"] != ir.trainable_params:
        raise SpecError(f"declared {expect['params']:,} trainable parameters, inferred {ir.trainable_params:,}",
                        file=ir.file, path="$.expect.params")
    if "non_trainable_params" in expect and expect["non_trainable_params"] != ir.non_trainable_params:
        raise SpecError(f"declared {expect['non_trainable_params']:,} non-trainable parameters, "
                        f"inferred {ir.non_trainable_params:,}", file=ir.file, path="$.expect.non_trainable_params")
    if "gmacs" in expect:
        got = ir.macs / 1e9
        if abs(got - expect["gmacs"]) > MACS_TOLERANCE * expect["gmacs"]:
            raise SpecError(f"declared {expect['gmacs']} GMACs, inferred {got:.4f} (more than "
                            f"{MACS_TOLERANCE:.1%} off)", file=ir.file, path="$.expect.gmacs")


def check_test_input(ir: IR, test_ir: IR) -> None:
    """A reduced test input must leave every parameter's shape as it is."""
    for name, p in ir.params.items():
        q = test_ir.params.get(name)
        if q is None or q.shape != p.shape:
            got = "missing" if q is None else fmt_shape(q.shape)
            raise SpecError(f"test_input changes parameter {name}: {fmt_shape(p.shape)} -> {got}",
                            file=ir.file, path="$.test_input")
