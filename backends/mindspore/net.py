"""The network Cell: the IR's schedule (samenet.graph) run over the builders' layers.

Both modes run one plan per mode: the schedule's steps as tuples ``(slot, call, input
slots, released slots)``, each call the node's Layer callable for that mode.

    * PyNative (``Net``): ``construct`` and ``forward_train`` loop over the plan as plain
      Python, releasing each value after its last reader (the schedule's ``free``), so
      activations are freed as early as a hand-written net frees them.
    * Graph (``GraphNet``): MindSpore's graph compiler parses construct's source, and a
      loop over the plan compiles far more slowly than straight-line code (its for-loop
      unrolling nests a call per iteration: 300 two-input steps, 15.8 s against 0.95 s;
      with the list comprehension and releases of the PyNative loop 35 s for 100 steps, and
      beyond about 250 steps it exceeds the compiler's call-depth limit). So graph mode
      compiles a *program*: the same plan written out as one statement per step,
      ``v7 = f[5](v3, v6)``, generated from the schedule alone (no op knowledge: the calls
      come in as the tuple ``f``), written to a file (the compiler reads source) and
      cached by its text. The compiled graph is the same ops either way.
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (sets MindSpore's log level and dump path before its import)

import atexit
import itertools
import os
import shutil
import sys
import tempfile
import types

from mindspore import nn

from samenet.graph import Schedule, layer_names, missing_builders, schedules

from .builders import BUILDERS, Context

Plan = tuple  # ((slot, call, input slots, released slots), ...)


class Net(nn.Cell):
    """The IR's network, PyNative: each mode's plan run as a loop.

    Attributes:
        eval_plan, train_plan: Each mode's plan (the module docs).
        size: Value slots (slot 0 is the input).
        main: Slot of the main output.
        train_outputs: Slots of the outputs in train mode (main, then auxiliary).
        aux_weights: ``(position in the train outputs, loss weight)`` of each auxiliary head.
    """

    def __init__(self, layers: dict[str, nn.Cell], plans: dict[bool, Plan], eval_schedule: Schedule,
                 train_schedule: Schedule):
        super().__init__()
        for name, cell in layers.items():
            self.insert_child_to_cell(name, cell)
        self.eval_plan, self.train_plan = plans[False], plans[True]
        self.size = eval_schedule.size
        self.main = eval_schedule.main
        self.train_outputs = train_schedule.outputs
        self.aux_weights = tuple((k, float(w)) for k, (_, w) in enumerate(train_schedule.aux, 1))
        self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

    def construct(self, x):
        values = [None] * self.size
        values[0] = x
        for i, call, inputs, free in self.eval_plan:
            values[i] = call(*[values[j] for j in inputs])
            for j in free:
                values[j] = None
        return values[self.main]

    def forward_train(self, x):
        values = [None] * self.size
        values[0] = x
        for i, call, inputs, free in self.train_plan:
            values[i] = call(*[values[j] for j in inputs])
            for j in free:
                values[j] = None
        return tuple([values[j] for j in self.train_outputs])

    def train_loss(self, x, y):
        outs = self.forward_train(x)
        loss = self.ce(outs[0], y)
        for k, w in self.aux_weights:
            loss = loss + w * self.ce(outs[k], y)
        return loss


class GraphNet(Net):
    """The IR's network for ms.jit: each mode's plan as a straight-line program (module docs)."""

    def __init__(self, layers, plans, eval_schedule, train_schedule):
        super().__init__(layers, plans, eval_schedule, train_schedule)
        self.eval_calls = tuple(step[1] for step in self.eval_plan)
        self.train_calls = tuple(step[1] for step in self.train_plan)
        self.eval_program = program(self.eval_plan, (self.main,), False)
        self.train_program = program(self.train_plan, self.train_outputs, True)

    def construct(self, x):
        return self.eval_program(self.eval_calls, x)

    def forward_train(self, x):
        return self.train_program(self.train_calls, x)


class Forward(nn.Cell):
    """The network's eval or train-mode forward as a Cell of its own (ms.jit compiles Cells)."""

    def __init__(self, net, train: bool):
        super().__init__(auto_prefix=False)
        self.net = net
        self.train = train

    def construct(self, x):
        if self.train:
            return self.net.forward_train(x)
        return self.net(x)


class TrainLoss(nn.Cell):
    """The train step's loss (main cross-entropy plus the weighted auxiliary ones)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x, y):
        return self.net.train_loss(x, y)


def build_net(ir, config, graph: bool):
    """The network of ``ir``; returns (net, canonical name -> Parameter, node name -> Cell).

    ``graph``: built for ms.jit (GraphNet, and the max pools' graph-mode training kernel).
    """
    missing_builders(ir, BUILDERS, "mindspore")
    ctx = Context(ir, config, graph=graph)
    keys = layer_names(ir, "mindspore")
    built = {n.name: BUILDERS[n.op](n, ctx) for n in ir.nodes if n.name in keys}
    sched = schedules(ir)
    plans = {train: tuple((s.index, _call(built[ir.nodes[s.index].name], train), s.inputs, s.free)
                          for s in sched[train].steps) for train in (False, True)}
    # "n_": no layer name can shadow the network's own attributes (ce, size...)
    layers = {"n_" + keys[name]: layer.cell for name, layer in built.items() if layer.cell is not None}
    net = (GraphNet if graph else Net)(layers, plans, sched[False], sched[True])
    canonical = {f"{name}.{local}": p for name, layer in built.items() for local, p in layer.params.items()}
    for name, p in canonical.items():  # readable, unique names (set after the auto-prefixing)
        p.name = name
    return net, canonical, {name: layer.cell for name, layer in built.items() if layer.cell is not None}


def _call(layer, train: bool):
    return layer.train if train else layer.eval


# --------------------------------------------------------------------------- graph-mode programs

_PROGRAMS: dict[str, types.FunctionType] = {}
_SOURCE_DIR: str | None = None
_COUNT = itertools.count()


def program(plan: Plan, outputs: tuple[int, ...], as_tuple: bool) -> types.FunctionType:
    """``run(f, x)``: the plan's steps as straight-line statements, step k calling ``f[k]``.

    Returns the outputs' values (a tuple when ``as_tuple``, else the one output). Generated
    from slots alone, so one function serves every network of the same shape of schedule.
    """
    lines = ["def run(f, x):", "    v0 = x"]
    for k, (i, _, inputs, _) in enumerate(plan):
        lines.append(f"    v{i} = f[{k}]({', '.join(f'v{j}' for j in inputs)})")
    values = ", ".join(f"v{j}" for j in outputs)
    lines.append(f"    return ({values},)" if as_tuple else f"    return {values}")
    source = "\n".join(lines) + "\n"
    if source not in _PROGRAMS:
        _PROGRAMS[source] = _load(source)
    return _PROGRAMS[source]


def _load(source: str) -> types.FunctionType:
    """Writes the source to a file and imports it as a module (the graph compiler reads the
    file and imports the function's module by name); the module holds no Cells."""
    global _SOURCE_DIR
    if _SOURCE_DIR is None:
        _SOURCE_DIR = tempfile.mkdtemp(prefix="samenet-mindspore-programs-")
        atexit.register(shutil.rmtree, _SOURCE_DIR, True)
    name = f"samenet_mindspore_program_{os.getpid()}_{next(_COUNT)}"
    path = os.path.join(_SOURCE_DIR, name + ".py")
    with open(path, "w") as f:
        f.write(source)
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102  (our own generated code)
    return module.run
