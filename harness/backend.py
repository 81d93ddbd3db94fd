"""The backend protocol, and lazy discovery of the backends registered in ``backends/``.

A backend wraps one framework. Its module imports the framework only inside methods
(``import_framework`` first), so listing, configuring and registering backends never
imports a framework. One instance holds one built model.

Train step contract (every backend implements exactly this, and the parity tests prove it):

    loss = mean over the batch of cross_entropy(main logits, y)
           + sum_k weight_k * mean cross_entropy(aux_k logits, y)      (train mode only)
    for every trainable parameter w with gradient g = dloss/dw:
        g = g + weight_decay * w            (L2 added to the gradient, PyTorch's SGD)
        v = momentum * v + g                (v starts at 0, so v = g at the first step)
        w = w - lr * v
    BN running statistics update as in harness.ops (PyTorch momentum, unbiased variance).

The inference step is a forward pass in eval semantics without gradient bookkeeping.
"""

from __future__ import annotations

import abc
import fnmatch
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .errors import UnsupportedError, UsageError

PRECISIONS = ("fp32", "tf32", "amp-bf16", "amp-fp16")
"""fp32: true fp32 (TF32 off); tf32: TF32 matmuls/convs allowed (GPU); amp-*: autocast mixed precision."""

VERIFY_PRECISION = "fp64"
"""float64 throughout, for verification only (``Backend.verifies_fp64``): parity's proof that a
float32 miss is rounding, as the same build in float64 then matches the float64 oracle."""


def storage_dtype(precision: str) -> str:
    """Name of the dtype a build keeps weights and activations in: "float64" for
    VERIFY_PRECISION, "float32" for every other precision (amp casts inside the step)."""
    return "float64" if precision == VERIFY_PRECISION else "float32"


DEVICE_KINDS = ("cpu", "cuda", "ascend")


@dataclass(frozen=True)
class Optimizer:
    """Hyper-parameters of the written SGD update rule (module docs)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class BuildConfig:
    """How to build a model.

    Attributes:
        device: ``cpu``, ``cuda`` or ``cuda:N``, ``ascend``.
        precision: One of PRECISIONS.
        exec_mode: Backend execution mode (its first mode by default).
        options: Backend options by name (e.g. ``memory_format``), defaults filled in.
        optimizer: Train-step hyper-parameters.
    """

    device: str = "cpu"
    precision: str = "fp32"
    exec_mode: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    optimizer: Optimizer = field(default_factory=Optimizer)


class Backend(abc.ABC):
    """One framework behind the common protocol.

    Class attributes declare what a backend offers; they are read without importing the
    framework.

    Attributes:
        name: Registry name (also its tox env's name).
        framework: Import name of the framework (for ``available``).
        distribution: pip distribution name, for version lookup without import.
        exec_modes: Execution modes; the first is the default.
        options: Backend options and their allowed values; the first value is the default.
        known_gaps: What this backend cannot match, as data: glob patterns over conformance
            test ids (``op:lrn/*``, ``model:inception_v4``, ``train:*``) -> reason. Tests
            matching a pattern are expected to fail (strict xfail) and reported with it.
        bn_variance: How the framework updates BN running variance: ``unbiased`` (PyTorch,
            the IR's convention) or ``biased`` (Keras); parity checks convert the latter.
        verifies_fp64: Builds in float64 (VERIFY_PRECISION) for parity's rounding proof.
        reference: The framework-free numpy executor: measured only when named, never as
            part of ``--backends all`` (it trains a ResNet in minutes per step).
    """

    name: ClassVar[str]
    framework: ClassVar[str]
    distribution: ClassVar[str]
    exec_modes: ClassVar[tuple[str, ...]] = ("eager",)
    options: ClassVar[dict[str, tuple[str, ...]]] = {}
    known_gaps: ClassVar[dict[str, str]] = {}
    bn_variance: ClassVar[str] = "unbiased"
    verifies_fp64: ClassVar[bool] = False
    reference: ClassVar[bool] = False

    # ------------------------------------------------------------------ no framework needed

    @classmethod
    def available(cls) -> bool:
        """Whether the framework is installed here (found, not imported)."""
        return importlib.util.find_spec(cls.framework) is not None

    @classmethod
    def installed_version(cls) -> str | None:
        from importlib import metadata

        try:
            return metadata.version(cls.distribution)
        except metadata.PackageNotFoundError:
            return None

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        """Variables the cell process needs before the framework is imported.

        ``tuned`` applies the framework's documented best practice for the core budget;
        otherwise stock defaults (the runner removes thread variables it inherited).
        """
        if not tuned:
            return {}
        n = str(threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}

    @classmethod
    def gap_reason(cls, test_id: str) -> str | None:
        """The known-gap reason matching a conformance test id, if any."""
        for pattern, reason in cls.known_gaps.items():
            if fnmatch.fnmatchcase(test_id, pattern):
                return reason
        return None

    @classmethod
    def resolve_config(cls, config: BuildConfig) -> BuildConfig:
        """Checks exec mode and options, filling in defaults (raises UsageError)."""
        mode = config.exec_mode or cls.exec_modes[0]
        if mode not in cls.exec_modes:
            raise UsageError(f"backend {cls.name} has no exec mode '{mode}' (modes: {', '.join(cls.exec_modes)})")
        options = {}
        for key, value in config.options.items():
            if key not in cls.options:
                raise UsageError(f"backend {cls.name} has no option '{key}' (options: {', '.join(cls.options) or 'none'})")
            if value not in cls.options[key]:
                raise UsageError(f"backend {cls.name} option {key}: '{value}' not in {', '.join(cls.options[key])}")
            options[key] = value
        for key, values in cls.options.items():
            options.setdefault(key, values[0])
        if config.precision == VERIFY_PRECISION and not cls.verifies_fp64:
            raise UnsupportedError(f"backend {cls.name}: no {VERIFY_PRECISION} verification build")
        if config.precision not in PRECISIONS + (VERIFY_PRECISION,):
            raise UsageError(f"unknown precision '{config.precision}' (known: {', '.join(PRECISIONS)})")
        return BuildConfig(config.device, config.precision, mode, options, config.optimizer)

    # ------------------------------------------------------------------ framework calls

    @abc.abstractmethod
    def import_framework(self) -> None:
        """Imports the framework (the runner times this)."""

    @abc.abstractmethod
    def version(self) -> str:
        """Framework version string."""

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        """Applies thread settings after import; returns the settings in effect, for the row."""
        return {}

    def devices(self) -> list[str]:
        """Devices this framework can use here."""
        return ["cpu"]

    @abc.abstractmethod
    def build(self, ir, config: BuildConfig) -> None:
        """Builds the IR natively (raises UnsupportedError for what it cannot build)."""

    @abc.abstractmethod
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Loads canonical weights (names and layouts of the IR's parameter table)."""

    @abc.abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """Exports canonical weights, every IR parameter, float32."""

    @abc.abstractmethod
    def param_counts(self) -> tuple[int, int]:
        """(trainable, non-trainable) as the framework itself counts its model's variables."""

    @abc.abstractmethod
    def forward(self, x: np.ndarray, train: bool = False) -> list[np.ndarray]:
        """Forward pass on numpy input; outputs as numpy (main first; aux heads in train)."""

    @abc.abstractmethod
    def to_device(self, x: np.ndarray, y: np.ndarray) -> Any:
        """Moves a batch to the device once, before timing."""

    @abc.abstractmethod
    def infer_step(self, batch) -> Any:
        """One inference step (eval, no gradients). May return before the device finishes."""

    @abc.abstractmethod
    def train_step(self, batch) -> Any:
        """One training step per the module's contract; returns the loss (not synchronised)."""

    def set_lr(self, lr: float) -> None:
        """Changes the learning rate of later train steps (schedules; momentum buffers kept)."""
        raise UnsupportedError(f"backend {self.name}: changing the learning rate is not supported")

    def loss_value(self, loss) -> float:
        """A loss returned by ``train_step`` as a Python float (synchronises)."""
        return float(np.asarray(loss))

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        """Fixes dropout/drop_path keep-masks for the next train steps (parity runs).

        ``masks`` maps node names to boolean keep-masks: (N, *node shape) for dropout, (N,)
        for drop_path; None restores random masks. Scaling by 1 / (1 - rate) is the op's.
        """
        raise UnsupportedError(f"backend {self.name}: fixed dropout masks not supported")

    def synchronize(self) -> None:
        """Waits until the device has finished all queued work."""

    def memory_stats(self) -> dict[str, float]:
        """Device allocator figures in MB (``alloc_peak_mb``, ``reserved_peak_mb``...)."""
        return {}


# --------------------------------------------------------------------------- registry


def registry() -> dict[str, str]:
    """Backend name -> ``module:Class``.

    backends/__init__.py holds the project's lines; ``SAMENET_BACKENDS`` adds more
    (``name=module:Class,...``), for third-party backends and for tests.
    """
    import backends

    reg = dict(backends.REGISTRY)
    for item in os.environ.get("SAMENET_BACKENDS", "").split(","):
        name, sep, target = item.strip().partition("=")
        if sep and ":" in target:
            reg[name] = target
    return reg


def names() -> list[str]:
    return list(registry())


def framework_names() -> list[str]:
    """The backends that wrap a framework: what ``--backends all`` measures."""
    return [n for n in names() if not get(n).reference]


def get(name: str) -> type[Backend]:
    """The backend class (imports its module, never its framework)."""
    reg = registry()
    if name not in reg:
        raise UsageError(f"unknown backend '{name}' (known: {', '.join(reg)})")
    module, _, cls = reg[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def split_device(device: str) -> tuple[str, int]:
    """``cuda:1`` -> ("cuda", 1); ``gpu`` is an alias of ``cuda``."""
    kind, _, index = device.partition(":")
    kind = "cuda" if kind == "gpu" else kind
    if kind not in DEVICE_KINDS:
        raise UsageError(f"unknown device '{device}' (known: {', '.join(DEVICE_KINDS)}, optionally :N)")
    try:
        return kind, int(index or 0)
    except ValueError:
        raise UsageError(f"bad device index in '{device}'") from None


def default_threads() -> int:
    """The core budget: CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def unsupported(what: str) -> UnsupportedError:
    return UnsupportedError(what)
