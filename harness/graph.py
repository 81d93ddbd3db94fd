"""How every executor walks an IR: the schedule, framework-safe layer names, the outputs.

The numpy reference and every backend run a network the same way: the IR's nodes in order,
each output released after its last reader, the main output first and, in train mode, the
auxiliary heads with their loss weights. This module computes that once per IR and mode;
executors only call their layers (``Schedule.run``, or their own loop over ``steps`` where a
framework compiles the loop's source, as MindSpore's graph mode does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import UnsupportedError
from .ops import INPUT_OP


@dataclass(frozen=True)
class Step:
    """One node's execution.

    Attributes:
        index: The node's position in ``ir.nodes`` (and in the value list).
        inputs: Positions of its inputs.
        free: Positions whose value is read for the last time here (released after it).
    """

    index: int
    inputs: tuple[int, ...]
    free: tuple[int, ...]


@dataclass(frozen=True)
class Schedule:
    """The nodes to run in one mode, in order, with last-use releases and the outputs.

    Attributes:
        train: Train mode (auxiliary heads and train-only nodes run).
        steps: Every node but the input, in IR order, that runs in this mode.
        size: Number of value slots (``len(ir.nodes)``); slot 0 is the input.
        main: Slot of the main output.
        aux: ``(slot, loss weight)`` of each auxiliary output (train mode only; else empty).
    """

    train: bool
    steps: tuple[Step, ...]
    size: int
    main: int
    aux: tuple[tuple[int, float], ...]

    @property
    def outputs(self) -> tuple[int, ...]:
        """Slots of the outputs this mode returns: the main one, then the auxiliary ones."""
        return (self.main, *(slot for slot, _ in self.aux))

    def run(self, x: Any, call: Callable[[int, list], Any]) -> list:
        """Runs the schedule: ``call(index, inputs)`` per step; returns the outputs' values."""
        values: list = [None] * self.size
        values[0] = x
        for step in self.steps:
            values[step.index] = call(step.index, [values[j] for j in step.inputs])
            for j in step.free:
                values[j] = None
        return [values[j] for j in self.outputs]


def schedule(ir, train: bool) -> Schedule:
    """The schedule of ``ir`` in train or eval mode."""
    index = {n.name: i for i, n in enumerate(ir.nodes)}
    last = ir.last_use(train)
    steps = []
    for i, n in enumerate(ir.nodes):
        if n.op == INPUT_OP or (n.train_only and not train):
            continue
        free = tuple(index[s] for s in dict.fromkeys(n.inputs) if last.get(s) == i)
        steps.append(Step(i, tuple(index[s] for s in n.inputs), free))
    aux = tuple((index[o.node], o.weight) for o in ir.outputs[1:]) if train else ()
    return Schedule(train, tuple(steps), len(ir.nodes), index[ir.outputs[0].node], aux)


def schedules(ir) -> dict[bool, Schedule]:
    """Both schedules, keyed by ``train``."""
    return {train: schedule(ir, train) for train in (False, True)}


def layer_names(ir, backend: str, sep: str = "__", pattern: str = r"[^A-Za-z0-9_]") -> dict[str, str]:
    """Node name -> a name the framework accepts for its layer, unique in the model.

    Dots (the IR's scope separator) become ``sep``; any other character matching
    ``pattern`` becomes ``_``.

    Raises:
        UnsupportedError: two node names map to the same layer name.
    """
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for n in ir.nodes:
        if n.op == INPUT_OP:
            continue
        key = re.sub(pattern, "_", n.name.replace(".", sep))
        if key in taken:
            raise UnsupportedError(f"{backend} backend: node names {n.name} and {taken[key]} collide as {key}")
        taken[key] = n.name
        names[n.name] = key
    return names


def unpack_outputs(outputs: Sequence) -> tuple:
    """What a model's forward returns: the main output alone, or a tuple with the aux ones."""
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def as_output_list(out: Any) -> list:
    """The inverse of :func:`unpack_outputs`: a model's forward result as a list of outputs."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def missing_builders(ir, builders, backend: str) -> None:
    """Raises UnsupportedError naming the first op of ``ir`` that ``builders`` lacks."""
    for n in ir.nodes:
        if n.op != INPUT_OP and n.op not in builders:
            raise UnsupportedError(f"{backend} backend: op {n.op} not implemented")


@dataclass
class BuildContext:
    """What a builder gets beside its node; every backend's builders take ``(node, ctx)``.

    A backend may subclass it to carry its own state (dtype, layout, device...).

    Attributes:
        ir: The network being built.
        config: Its resolved BuildConfig.
    """

    ir: Any
    config: Any = None

    def in_shapes(self, node) -> list[tuple[int, ...]]:
        """Per-sample shapes of the node's inputs."""
        return [self.ir.node(s).shape for s in node.inputs]
