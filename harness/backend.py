"""The backend protocol, and discovery of the registered backends.

A backend is a package in ``backends/``: its ``__init__`` holds a :class:`BackendInfo` (name,
pins, modes, options, capabilities, known gaps) and imports no framework, so listing,
configuring and checking backends never imports one; its implementation module imports the
framework at the top and defines a :class:`Backend`. One instance holds one built model.

Train step contract (every backend implements exactly this, and the parity tests prove it):

    loss = mean over the batch of cross_entropy(main logits, y)
           + sum_k weight_k * mean cross_entropy(aux_k logits, y)      (train mode only)
    for every trainable parameter w with gradient g = dloss/dw:
        g = g + weight_decay * w            (L2 added to the gradient, PyTorch's SGD)
        v = momentum * v + g                (v starts at 0, so v = g at the first step)
        w = w - lr * v
    BN running statistics update as in samenet.ops (PyTorch momentum, unbiased variance).

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
        optimizer: Train-step hyper-parameters; None builds for inference only: no optimiser
            and no training state (an inference cell's build), and ``train_step`` then raises.
    """

    device: str = "cpu"
    precision: str = "fp32"
    exec_mode: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    optimizer: Optimizer | None = field(default_factory=Optimizer)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared as data and obeyed by the runner, parity and conformance.

    Attributes:
        train: Training steps (``train_step``); False makes an inference-only backend.
        infer: Inference steps (``infer_step``).
        masks: Fixed dropout/drop_path keep-masks (``set_masks``), needed by training parity
            of networks with dropout.
        set_lr: Changing the learning rate between steps (``set_lr``), needed by schedules.
        fp64: A float64 build (VERIFY_PRECISION), parity's proof that a float32 miss is rounding.
        data_parallel: Data-parallel training over several processes.
        devices: Device kinds it can build on (of DEVICE_KINDS).
        precisions: Precisions it can build in (of PRECISIONS).
    """

    train: bool = True
    infer: bool = True
    masks: bool = True
    set_lr: bool = True
    fp64: bool = False
    data_parallel: bool = False
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)

    def lacks(self, mode: str) -> str | None:
        """Why a step of ``mode`` (train or infer) cannot run, or None when it can."""
        if mode == "train" and not self.train:
            return "no training (inference-only backend)"
        if mode == "infer" and not self.infer:
            return "no inference steps"
        return None


DP_BN_SEMANTICS = {
    "broadcast": "per-rank batch statistics; rank 0's running statistics copied to every rank before each "
                 "forward (torch DDP's broadcast_buffers)",
    "local": "per-rank batch statistics; each rank keeps its own running statistics",
    "mean": "per-rank batch statistics; running statistics averaged over the ranks after each step",
    "sync": "batch statistics of the global batch (synchronised BN); running statistics from them",
}
"""Data-parallel BatchNorm semantics the oracle models (samenet.conformance.dp_oracle)."""


@dataclass(frozen=True)
class DataParallel:
    """How a backend trains data-parallel, declared as data (the runner and the oracle obey it).

    Attributes:
        engine: The framework's own data-parallel engine, for the row.
        transports: Device kind -> collective transport (``{"cpu": "gloo", "cuda": "nccl"}``).
        launcher: How the ranks meet, for the row.
        bn: BatchNorm semantics of its default data-parallel build (a key of DP_BN_SEMANTICS).
        ports: Free ports on 127.0.0.1 it needs (passed in ``Rendezvous.ports``).
        rank_exit: How a rank's process ends once its row is written and its group left:
            ``normal`` (the interpreter's exit: engines that leave their group there, ps-lite)
            or ``immediate`` (``os._exit``, as a single cell ends: no teardown to race with
            the engine's threads).
    """

    engine: str
    transports: dict[str, str]
    launcher: str
    bn: str = "local"
    ports: int = 1
    rank_exit: str = "normal"

    def __post_init__(self):
        if self.rank_exit not in ("normal", "immediate"):
            raise ValueError(f"DataParallel.rank_exit must be 'normal' or 'immediate', not {self.rank_exit!r}")


class BackendInfo:
    """What the harness knows of a backend without importing its framework.

    Each backend package's ``__init__`` subclasses this with class attributes and exposes one
    instance as ``INFO``; the implementation (``impl``, ``module:Class``) imports the framework.

    Attributes:
        name: Registry name (also its tox env's name).
        framework: Import name of the framework (for ``available``).
        distributions: pip distribution names, first found gives the version (no import).
        pins: pip requirements of its tox env (tox.ini must list them; a core test checks).
        impl: ``module:Class`` of the implementation (a :class:`Backend`).
        builders: Module holding the builder table (``BUILDERS``), read as text by the core
            tests; the impl's module by default.
        exec_modes: Execution modes; the first is the default.
        options: Backend options and their allowed values; the first value is the default.
        capabilities: What it can do (:class:`Capabilities`).
        known_gaps: What this backend cannot match, as data: glob patterns over conformance
            test ids (``op:lrn/*``, ``model:inception_v4``, ``train:*``) -> reason. Tests
            matching a pattern are expected to fail (strict xfail) and reported with it;
            an ``op:NAME/*`` gap also excuses a missing builder.
        bn_variance: How the framework updates BN running variance: ``unbiased`` (PyTorch,
            the IR's convention) or ``biased`` (Keras); parity checks convert the latter.
        data_parallel: How it trains data-parallel (:class:`DataParallel`), with the
            ``data_parallel`` capability; None without.
        reference: The framework-free numpy executor: measured only when named, never as
            part of ``--backends all`` (it trains a ResNet in minutes per step).
    """

    name: ClassVar[str]
    framework: ClassVar[str]
    distributions: ClassVar[tuple[str, ...]] = ()
    pins: ClassVar[tuple[str, ...]] = ()
    impl: ClassVar[str]
    builders: ClassVar[str | None] = None
    exec_modes: ClassVar[tuple[str, ...]] = ("eager",)
    options: ClassVar[dict[str, tuple[str, ...]]] = {}
    capabilities: ClassVar[Capabilities] = Capabilities()
    known_gaps: ClassVar[dict[str, str]] = {}
    bn_variance: ClassVar[str] = "unbiased"
    reference: ClassVar[bool] = False
    data_parallel: ClassVar[DataParallel | None] = None

    def __repr__(self) -> str:
        return f"<backend {self.name}>"

    @property
    def verifies_fp64(self) -> bool:
        """Builds in float64 (VERIFY_PRECISION) for parity's rounding proof."""
        return self.capabilities.fp64

    @property
    def builders_module(self) -> str:
        return self.builders or self.impl.partition(":")[0]

    def available(self) -> bool:
        """Whether the framework is installed here (found, not imported)."""
        return importlib.util.find_spec(self.framework) is not None

    def installed_version(self) -> str | None:
        from importlib import metadata

        for dist in self.distributions or (self.framework,):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """Variables the cell process needs before the framework is imported.

        ``tuned`` applies the framework's documented best practice for the core budget;
        otherwise stock defaults (the runner removes thread variables it inherited).
        """
        if not tuned:
            return {}
        n = str(threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}

    def dp_env(self, rendezvous) -> dict[str, str]:
        """Variables a data-parallel rank needs before the framework is imported (TF_CONFIG...).

        Args:
            rendezvous: The rank's samenet.distributed.Rendezvous.
        """
        return {}

    def dp_helpers(self, world: int, host: str, ports: tuple[int, ...]) -> list:
        """The engine's helper processes (samenet.distributed.Helper), started before the ranks."""
        return []

    def gap_reason(self, test_id: str) -> str | None:
        """The known-gap reason matching a conformance test id, if any."""
        for pattern, reason in self.known_gaps.items():
            if fnmatch.fnmatchcase(test_id, pattern):
                return reason
        return None

    def resolve_config(self, config: BuildConfig) -> BuildConfig:
        """Checks exec mode, options, device and precision, filling in defaults.

        Raises:
            UsageError: unknown mode, option, value or precision.
            UnsupportedError: a device kind or precision the capabilities do not declare.
        """
        mode = config.exec_mode or self.exec_modes[0]
        if mode not in self.exec_modes:
            raise UsageError(f"backend {self.name} has no exec mode '{mode}' (modes: {', '.join(self.exec_modes)})")
        options = {}
        for key, value in config.options.items():
            if key not in self.options:
                raise UsageError(f"backend {self.name} has no option '{key}' (options: {', '.join(self.options) or 'none'})")
            if value not in self.options[key]:
                raise UsageError(f"backend {self.name} option {key}: '{value}' not in {', '.join(self.options[key])}")
            options[key] = value
        for key, values in self.options.items():
            options.setdefault(key, values[0])
        if config.precision not in PRECISIONS + (VERIFY_PRECISION,):
            raise UsageError(f"unknown precision '{config.precision}' (known: {', '.join(PRECISIONS)})")
        if config.precision == VERIFY_PRECISION and not self.capabilities.fp64:
            raise UnsupportedError(f"backend {self.name}: no {VERIFY_PRECISION} verification build")
        if config.precision in PRECISIONS and config.precision not in self.capabilities.precisions:
            raise UnsupportedError(f"backend {self.name}: precision {config.precision} not supported "
                                   f"(declared: {', '.join(self.capabilities.precisions)})")
        kind, _ = split_device(config.device)
        if kind not in self.capabilities.devices:
            raise UnsupportedError(f"backend {self.name}: device {kind} not supported "
                                   f"(declared: {', '.join(self.capabilities.devices)})")
        return BuildConfig(config.device, config.precision, mode, options, config.optimizer)

    def load(self) -> type[Backend]:
        """The implementation class (imports its module, which imports the framework)."""
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)

    def create(self) -> Backend:
        """A new implementation instance, its framework imported (``import_framework``)."""
        backend = self.load()(self)
        backend.import_framework()
        return backend


class Backend(abc.ABC):
    """One framework behind the common protocol; one instance holds one built model.

    Its module imports the framework at the top and is only imported through
    :meth:`BackendInfo.load`. What the backend declares (modes, options, capabilities, gaps)
    is its :class:`BackendInfo`, ``self.info``.
    """

    def __init__(self, info: BackendInfo):
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    # ------------------------------------------------------------------ framework calls

    def import_framework(self) -> None:
        """Finishes importing the framework (the runner times ``create``, which calls this)."""

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

    def require_optimizer(self, config: BuildConfig) -> Optimizer:
        """The build's optimiser settings; raises if it was built for inference only."""
        if config.optimizer is None:
            raise RuntimeError(f"backend {self.name}: built for inference only (BuildConfig.optimizer is None); "
                               "no training step")
        return config.optimizer

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

    # ------------------------------------------------------------------ data parallel

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        """Joins the data-parallel group before ``build``; later builds train through the
        framework's engine (gradients averaged over the ranks). Returns figures for the row
        (transport...).

        Args:
            rendezvous: This rank's samenet.distributed.Rendezvous.
        """
        raise UnsupportedError(f"backend {self.name}: no data-parallel training")

    def barrier(self) -> None:
        """Returns when every rank has reached it (the engine's own collective)."""

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        """Seconds of each of ``iters`` all-reduces (sum) of ``nbytes`` of float32 on the group's
        transport, each between barriers, after one untimed."""
        raise UnsupportedError(f"backend {self.name}: no data-parallel training")

    def shutdown_distributed(self) -> None:
        """Leaves the group (the process exits next)."""

    def memory_stats(self) -> dict[str, float]:
        """Device allocator figures in MB (``alloc_peak_mb``, ``reserved_peak_mb``...)."""
        return {}


# --------------------------------------------------------------------------- registry

ENTRY_POINT_GROUP = "samenet.backends"


def registry() -> dict[str, str]:
    """Backend name -> ``module:attribute`` of its :class:`BackendInfo`.

    The project's backends are entry points of the ``samenet.backends`` group (pyproject.toml,
    one line each), so the harness never imports the ``backends`` package by name;
    ``SAMENET_BACKENDS`` adds more (``name=module:attribute,...``), for third-party backends
    and for tests.
    """
    from importlib import metadata

    reg = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for item in os.environ.get("SAMENET_BACKENDS", "").split(","):
        name, sep, target = item.strip().partition("=")
        if sep and ":" in target:
            reg[name] = target
    return dict(sorted(reg.items(), key=lambda kv: _ORDER.get(kv[0], len(_ORDER))))


_ORDER = {name: i for i, name in enumerate(("numpy", "torch", "tf", "mxnet", "paddle", "mindspore", "keras-torch",
                                             "keras-jax"))}
"""Display order of the project's backends (others follow in name order)."""


def names() -> list[str]:
    return list(registry())


def framework_names() -> list[str]:
    """The backends that wrap a framework: what ``--backends all`` measures."""
    return [n for n in names() if not get(n).reference]


def get(name: str) -> BackendInfo:
    """The backend's metadata (imports its package, never its framework)."""
    reg = registry()
    if name not in reg:
        raise UsageError(f"unknown backend '{name}' (known: {', '.join(reg)})")
    module, _, attr = reg[name].partition(":")
    try:
        info = getattr(importlib.import_module(module), attr or "INFO")
    except (ImportError, AttributeError) as e:
        raise UsageError(f"backend '{name}' is registered as {reg[name]}, which cannot be loaded: {e}") from None
    if not isinstance(info, BackendInfo):
        raise UsageError(f"backend '{name}' is registered as {reg[name]}, which is not a BackendInfo")
    if info.name != name:
        raise UsageError(f"backend '{name}' is registered as {reg[name]}, whose name is '{info.name}'")
    return info


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

