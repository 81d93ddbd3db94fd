"""One measurement cell, run in its own process: ``python -m samenet.cell CONFIG.json ROW.json``.

The protocol (docs/measuring.md):

1. import the backend's implementation and its framework (timed: ``import_s``); RSS after
   import is the memory baseline; a mode its capabilities lack is an ``unsupported`` row;
2. load the IR, canonical weights (seeded, cached on disk) and a seeded synthetic batch, all
   before any timing of steps; build the model (``build_s``), load weights (``weights_s``),
   move the batch to the device (``to_device_s``);
3. one first step, synchronised (``first_step_s``: includes tracing/compilation);
4. ``warmup`` steps, untimed;
5. ``iters`` timed steps: ``perf_counter_ns`` read after the device is synchronised, per-step
   samples kept; median, p10, p90, mean, IQR...;
6. memory: peak RSS of the process, its increase over the post-import RSS, the peak during
   the steps alone (kernel high-water mark reset before the first step, where allowed), and
   on GPU the framework allocator's peak and the NVML figure of this process.

With ``--rank R RENDEZVOUS.json`` the process is rank R of a data-parallel cell (``workers`` >
1, samenet.distributed): it joins the group through the backend's engine before building,
trains on its shard of the global batch, times each step between two barriers (start and end
clocks kept for the parent, which takes the slowest rank's), and ends with an all-reduce
microbenchmark of the gradient's bytes on the same transport.

This process never imports pandas or plotting libraries. Whatever happens, it writes one row
(status ok, error, unsupported or oom); a crash or timeout is recorded by the parent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODES = ("train", "infer")
ROW_VERSION = 1


@dataclass(frozen=True)
class Cell:
    """Everything that defines one measurement (its key is a hash of all of it)."""

    backend: str
    model: str
    mode: str
    batch: int
    input: tuple[int, ...] | None = None  # None: the spec's default input
    device: str = "cpu"
    precision: str = "fp32"
    exec_mode: str | None = None  # None: the backend's default
    options: tuple[tuple[str, str], ...] = ()
    threads: int = 1
    cpu_settings: str = "tuned"  # tuned | stock
    warmup: int = 5
    iters: int = 20
    seed: int = 0
    repeat: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    workers: int = 1
    scaling: str = "weak"  # weak: batch is per worker; strong: batch is the global batch
    # A data-parallel group across hosts (samenet.distributed.group_of): every host's address
    # in node-rank order, this launcher's node rank, the group's first port. Empty: one host.
    hosts: tuple[str, ...] = ()
    node_rank: int = 0
    rendezvous_port: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input"] = list(self.input) if self.input else None
        d["options"] = dict(self.options)
        if self.workers == 1:  # one process: the keys of cells measured before workers existed
            del d["workers"], d["scaling"]
        if self.hosts:
            d["hosts"] = list(self.hosts)
        else:  # one host: the keys of cells measured before hosts existed
            del d["hosts"], d["node_rank"], d["rendezvous_port"]
        return d

    @property
    def per_worker_batch(self) -> int:
        """Samples each rank takes per step."""
        return self.batch if self.scaling == "weak" else self.batch // self.workers

    @property
    def global_batch(self) -> int:
        """Samples all ranks take together per step."""
        return self.per_worker_batch * self.workers

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        d = dict(d)
        d["input"] = tuple(d["input"]) if d.get("input") else None
        d["options"] = tuple(sorted((d.get("options") or {}).items()))
        d["hosts"] = tuple(d.get("hosts") or ())
        return cls(**d)

    def key(self) -> str:
        d = self.to_dict()
        d.pop("rendezvous_port", None)  # where the group met, not what was measured
        text = json.dumps(d, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        mode = f" {self.exec_mode}" if self.exec_mode else ""
        workers = f" x{self.workers} {self.scaling}" if self.workers > 1 else ""
        if self.hosts:
            workers += f" on {len(self.hosts)} hosts (node {self.node_rank})"
        return (f"{self.backend}{mode} {self.model} {self.mode} b{self.batch}{workers}"
                + (f" r{self.repeat}" if self.repeat else ""))


def classify_error(exc: BaseException) -> str:
    from .errors import UnsupportedError

    if isinstance(exc, UnsupportedError):
        return "unsupported"
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "resourceexhausted" in text or "bad_alloc" in text:
        return "oom"
    return "error"


def weights_for(ir, seed: int):
    """Canonical weights of an IR, from the disk cache or made and cached."""
    from .conformance import cache_dir
    from .init import init_weights, load_weights, save_weights

    path = cache_dir() / "weights" / f"{ir.name}-{ir.fingerprint()}-s{seed}.npz"
    if path.exists():
        try:
            return load_weights(path, ir)
        except Exception:  # noqa: BLE001  (a torn or stale cache file: make it again)
            pass
    weights = init_weights(ir, seed)
    try:
        save_weights(path, weights)
    except OSError:
        pass
    return weights


ALLREDUCE_ITERS = 10
ALLREDUCE_PEAK_BYTES = 32 * 1024 * 1024
"""The all-reduce whose bus bandwidth stands for the transport's (B of the ring model)."""


def measure(cell: Cell, row: dict, rendezvous=None) -> None:
    """Runs the protocol, filling ``row`` as it goes (so a failure keeps what was measured).

    Args:
        rendezvous: This rank's samenet.distributed.Rendezvous in a data-parallel cell.
    """
    from . import backend as registry
    from . import measure as m
    from . import zoo
    from .backend import BuildConfig, Optimizer
    from .data import synthetic_batch
    from .errors import UnsupportedError

    row["rss_start_mb"] = m.rss_mb()
    info = registry.get(cell.backend)
    lacking = info.capabilities.lacks(cell.mode)
    if lacking:
        raise UnsupportedError(f"backend {info.name}: {lacking}")
    t = time.perf_counter()
    b = info.create()
    row["import_s"] = time.perf_counter() - t
    row["rss_after_import_mb"] = m.rss_mb()
    row["framework_version"] = b.version()
    row["settings"] = b.configure(cell.threads, cell.cpu_settings == "tuned")
    if rendezvous is not None:
        t = time.perf_counter()
        row.update(b.init_distributed(rendezvous))
        row["init_distributed_s"] = time.perf_counter() - t

    ir = zoo.load(cell.model, cell.input)
    row["spec_hash"] = ir.fingerprint()
    row["input"] = "x".join(map(str, ir.input_shape))
    row["macs_per_sample"] = ir.macs
    row["params_trainable"] = ir.trainable_params
    row["params_non_trainable"] = ir.non_trainable_params
    weights = weights_for(ir, cell.seed)
    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    if rendezvous is not None:  # this rank's shard of the global batch
        shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
        x, y = x[shard], y[shard]

    # An inference cell builds no optimiser nor training state (BuildConfig.optimizer None).
    optimizer = Optimizer(cell.lr, cell.momentum, cell.weight_decay) if cell.mode == "train" else None
    config = info.resolve_config(BuildConfig(cell.device, cell.precision, cell.exec_mode, dict(cell.options),
                                            optimizer))
    row["exec_mode"] = config.exec_mode
    row["options"] = config.options
    t = time.perf_counter()
    b.build(ir, config)
    row["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    b.set_weights(weights)
    row["weights_s"] = time.perf_counter() - t
    del weights
    t = time.perf_counter()
    batch = b.to_device(x, y)
    b.synchronize()
    row["to_device_s"] = time.perf_counter() - t
    row["rss_after_build_mb"] = m.rss_mb()

    step = b.train_step if cell.mode == "train" else b.infer_step
    row["step_peak_reset"] = m.reset_peak_rss()
    steps_start = t0 = time.perf_counter_ns()
    out = step(batch)
    b.synchronize()
    row["first_step_s"] = (time.perf_counter_ns() - t0) / 1e9
    for _ in range(cell.warmup):
        out = step(batch)
        b.synchronize()
    samples, starts = [], []
    for i in range(cell.iters):
        if rendezvous is not None:
            b.barrier()
        t0 = time.perf_counter_ns()
        out = step(batch)
        b.synchronize()
        t1 = time.perf_counter_ns()
        samples.append(t1 - t0)
        starts.append(t0)
        if rendezvous is not None and i == 0:
            from .distributed import inject_fault

            inject_fault(rendezvous.rank, "step")
    row["steps_s"] = (time.perf_counter_ns() - steps_start) / 1e9  # first, warm-up and timed steps
    if rendezvous is not None:
        b.barrier()
        row["step_start_ns"] = starts
    row["samples_ns"] = samples
    row.update(m.summarize(samples))
    if cell.mode == "train":
        row["last_loss"] = b.loss_value(out)
    if rendezvous is not None:
        _communication(b, ir, rendezvous, row)
    median = row.get("step_median_s")
    if median:
        row["samples_per_s"] = cell.per_worker_batch / median
        flops = 2 * ir.macs * (3 if cell.mode == "train" else 1) * cell.per_worker_batch
        row["gflops_per_s"] = flops / median / 1e9
    row["peak_rss_mb"] = m.peak_rss_mb()
    row["rss_increase_mb"] = row["peak_rss_mb"] - row["rss_after_import_mb"]
    row["peak_rss_steps_mb"] = m.hwm_rss_mb() if row["step_peak_reset"] else None
    gpu = b.memory_stats()
    row.update({f"gpu_{k}": v for k, v in gpu.items()})
    if cell.device != "cpu":
        row["gpu_nvml_mb"] = m.nvml_process_mb()
    row["status"] = "ok"


def _communication(b, ir, rendezvous, row: dict) -> None:
    """The all-reduce microbenchmark: the gradient's bytes, then a large message (for B)."""
    from .distributed import bus_bandwidth

    nbytes = 4 * ir.trainable_params
    row["grad_bytes"] = nbytes
    row["allreduce_samples_s"] = b.allreduce_seconds(nbytes, ALLREDUCE_ITERS)
    peak = max(nbytes, ALLREDUCE_PEAK_BYTES)
    row["allreduce_peak_bytes"] = peak
    peak_s = float(np.median(b.allreduce_seconds(peak, 3)))
    row["allreduce_peak_s"] = peak_s
    row["busbw_peak_bytes_per_s"] = bus_bandwidth(peak, rendezvous.world, peak_s)
    b.barrier()
    b.shutdown_distributed()


def write_row(path: Path, row: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row, default=str))
    tmp.replace(path)


def main(argv: list[str]) -> int:
    config_path, out_path = Path(argv[0]), Path(argv[1])
    cell = Cell.from_dict(json.loads(config_path.read_text()))
    rendezvous = None
    if len(argv) >= 4 and argv[2] == "--rank":
        from .distributed import Rendezvous

        rendezvous = Rendezvous.from_dict(json.loads(Path(argv[3]).read_text()))
    start = time.perf_counter()
    # The parent turns this into startup_s (from its spawn to here) and exit_s (from cell_s on).
    row: dict = {"status": "error", "row_version": ROW_VERSION, "pid": os.getpid(), "main_entry_unix": time.time(),
                 "python_version": sys.version.split()[0]}  # the cell's interpreter's, not the driver's
    try:
        measure(cell, row, rendezvous)
    except BaseException as exc:  # noqa: BLE001  (every failure becomes a row)
        row["status"] = classify_error(exc)
        row["error"] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500] if str(exc) else type(exc).__name__
        row["error_detail"] = "".join(traceback.format_exception(exc))[-4000:]
        if isinstance(exc, KeyboardInterrupt):
            write_row(out_path, row)
            return 130
    row["heavy_modules"] = sorted(m for m in ("pandas", "matplotlib") if m in sys.modules)
    row["cell_s"] = time.perf_counter() - start
    write_row(out_path, row)
    return 0


def _rank_exits_normally(argv: list[str]) -> bool:
    """True for a data-parallel rank whose backend leaves its group in the interpreter's exit."""
    if "--rank" not in argv:
        return False
    from .backend import get

    try:
        dp = get(json.loads(Path(argv[0]).read_text())["backend"]).data_parallel
    except Exception:  # noqa: BLE001  (a rank that could not even read its cell: the safe, normal exit)
        return True
    return dp is None or dp.rank_exit == "normal"


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if _rank_exits_normally(sys.argv[1:]):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    # The row is written: skip the interpreter's teardown of the framework's modules and
    # threads (0.9-1.4 s for TF and Keras-on-JAX on 2 cores), which every cell's wall time
    # and every sweep paid for nothing.
    os._exit(code)
