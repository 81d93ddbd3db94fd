"""The runner: every cell in its own process, under a timeout; every outcome is a row.

A sweep is the product of backends x models x modes x batch sizes (x repeats). Each cell
runs ``python -m samenet.cell`` with the backend's interpreter (this one if the framework is
installed here, else the backend's tox env ``.tox/<backend>``, or ``--python NAME=PATH``),
with the CPU settings of the backend set in its environment before the framework loads.
A crash (segfault included), a timeout or an out-of-memory kill still yields a row; the
sweep goes on. Cells already in the store are skipped unless forced, so an interrupted
sweep resumes where it stopped; with ``retry_failed`` a cell whose newest row failed (FAILED)
runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import backend as registry
from . import zoo
from .cell import Cell
import numpy as np

from .distributed import HOST, bus_bandwidth, ring_allreduce_s
from .env import ROOT, THREAD_VARS, host_environment, machine_class, sweep_environment
from .errors import UsageError
from .lifetime import release_interrupts, start_holding_interrupts
from .results import Store

Started = Callable[[Cell], None]
"""Called with each cell as it is handed to its process, task or job (the progress bar)."""
Rows = Iterator[tuple[int, dict]]
"""``(index in the cells given, row)`` pairs, in the order the cells end."""

OOM_SIGNS = ("out of memory", "bad_alloc", "memoryerror", "cannot allocate memory", "resourceexhausted")


def python_for(backend: str, overrides: dict[str, str] | None = None) -> str:
    """The interpreter that has the backend's framework.

    Order: ``--python NAME=PATH``, ``SAMENET_PYTHON_<NAME>``, this interpreter if the
    framework is installed here, the tox env ``.tox/<NAME>/bin/python``.
    """
    given = (overrides or {}).get(backend) or os.environ.get(f"SAMENET_PYTHON_{backend.upper()}")
    if given:  # children start in scratch folders: a relative path (.tox/x/bin/python) must not move
        return os.path.abspath(given) if os.sep in given else given
    if registry.get(backend).available():
        return sys.executable
    tox = ROOT / ".tox" / backend / "bin" / "python"
    if tox.exists():
        return str(tox)
    raise UsageError(f"backend {backend}: its framework is not installed here and there is no .tox/{backend} env "
                     f"(run 'tox -e {backend}' once, or pass --python {backend}=PATH)")


def child_environment(cell: Cell) -> dict[str, str]:
    env = dict(os.environ)
    if cell.cpu_settings == "stock":
        for k in THREAD_VARS:
            env.pop(k, None)
    env.update(registry.get(cell.backend).env_vars(cell.threads, cell.cpu_settings == "tuned"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_cell(cell: Cell, python: str, timeout: float, environment: dict | None = None) -> dict:
    """Runs one cell in a fresh process (``workers`` > 1: a group of them); always returns a row.

    Args:
        environment: The sweep's environment (env.sweep_environment), captured once by the
            driver; None captures it here.
    """
    if cell.workers > 1:
        return _finish_row(cell, python, child_environment(cell), *run_data_parallel(cell, python, timeout),
                           environment=environment)
    env = child_environment(cell)
    with tempfile.TemporaryDirectory(prefix="samenet-cell-") as tmp:
        config, out, log = Path(tmp) / "cell.json", Path(tmp) / "row.json", Path(tmp) / "log.txt"
        config.write_text(json.dumps(cell.to_dict()))
        load_before = os.getloadavg()[0]
        oom_kills_before = oom_kills()
        spawned = time.time()
        start = time.perf_counter()
        timed_out = False
        with open(log, "wb") as logf:
            # The cell runs in a scratch folder so frameworks that litter the working
            # directory (MindSpore's rank_0/, kernel_meta/) leave the user's folder clean.
            proc, held = start_holding_interrupts([python, "-m", "samenet.cell", str(config), str(out)], env=env,
                                                  cwd=tmp, stdout=logf, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
            try:
                release_interrupts(held)
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C: the cell (its own session, so not signalled) ends too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                row = {"status": INTERRUPTED, "error": "interrupted (Ctrl-C) while running; a resumed sweep reruns it"}
                raise CellInterrupted(_finish_row(cell, python, env, row, time.perf_counter() - start, load_before,
                                                  os.getloadavg()[0], environment)) from None
        wall = time.perf_counter() - start
        ended = time.time()
        load_after = os.getloadavg()[0]
        tail = log.read_text(errors="replace")[-3000:]
        if out.exists() and not timed_out:
            row = json.loads(out.read_text())
            entry = row.pop("main_entry_unix", None)
            if entry is not None and row.get("cell_s") is not None:  # the cell's overhead breakdown
                row["startup_s"] = entry - spawned  # interpreter start and the harness's imports
                row["exit_s"] = ended - entry - row["cell_s"]  # from the row written to the exit seen here
        else:
            row = {"status": "error"}
            lower = tail.lower()
            if timed_out:
                row.update(status="timeout", error=f"no result within {timeout:.0f} s (killed)")
            elif code < 0 and -code == signal.SIGKILL:
                kills = oom_kills()
                if kills is not None and oom_kills_before is not None and kills > oom_kills_before:
                    row.update(status="oom", error="killed by SIGKILL: the kernel's out-of-memory killer "
                                                   f"(its oom_kill count rose by {kills - oom_kills_before})")
                else:  # someone's kill -9, not the kernel's OOM killer (or the kernel does not say)
                    row.update(status="crash", error="killed by SIGKILL" + (
                        " (not the out-of-memory killer: the kernel's oom_kill count did not change)"
                        if kills is not None else " (whether by the out-of-memory killer is unknown here)"))
            elif any(s in lower for s in OOM_SIGNS):
                row.update(status="oom", error=f"exit {code}: out of memory")
            elif code < 0:
                row.update(status="crash", error=f"killed by {_signal_name(code)}")
            else:
                row.update(status="crash", error=f"exit code {code} without a result")
        if row.get("status") != "ok":
            row["log_tail"] = tail
    return _finish_row(cell, python, env, row, wall, load_before, load_after, environment)


def oom_kills() -> int | None:
    """The kernel's count of out-of-memory kills (``/proc/vmstat`` oom_kill: the system's and
    every memory cgroup's), or None where it does not say."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _finish_row(cell: Cell, python: str, env: dict, row: dict, wall: float, load_before: float,
                load_after: float, environment: dict | None = None) -> dict:
    row.update(cell.to_dict() | {k: v for k, v in row.items() if k in ("input", "exec_mode", "options")})
    # ``input`` in one form, a failed cell's (as asked, or the spec's default) as an ok cell's.
    row["input"] = zoo.input_text(cell.model, row["input"])
    # The load average shows whether something else competed for the cores during the cell.
    row.update(cell_key=cell.key(), wall_s=wall, load_avg_before=load_before,
               load_avg_after=load_after, thread_env={k: env[k] for k in THREAD_VARS if k in env})
    cell_python = row.pop("python_version", None)
    row.update(host_environment(environment))
    # ``python``: the version of the interpreter that ran the cell (None if it died before
    # saying), not the driver's that host_environment describes; ``python_path``: which one.
    row.update(python=cell_python, python_path=python, driver_python=row["python"])
    row["machine_class"] = machine_class()
    return row


def rank_device(device: str, rank: int) -> str:
    """One device per rank of a host: ``cuda`` -> ``cuda:<local rank>``; the CPU is shared."""
    kind, _ = registry.split_device(device)
    return device if kind == "cpu" or ":" in device else f"{kind}:{rank}"


def run_data_parallel(cell: Cell, python: str, timeout: float) -> tuple[dict, float, float, float]:
    """Runs a data-parallel cell: its ranks on this host (all ``cell.workers``, or this host's
    share of a group across ``cell.hosts``); returns (row, wall, load before, after)."""
    from .distributed import Rendezvous, describe_exit, group_of, launch, write_json

    info = registry.get(cell.backend)
    dp = info.data_parallel
    if dp is None or not info.capabilities.data_parallel:
        load = os.getloadavg()[0]
        why = info.gap_reason("dp:*")
        return ({"status": "unsupported", "error": f"backend {info.name}: no data-parallel training"
                 + (f" ({why})" if why else "")}, 0.0, load, load)
    env = child_environment(cell)
    group = group_of(cell.workers, dp.ports, cell.hosts, cell.node_rank, cell.rendezvous_port)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="samenet-dp-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "cell.json").write_text(json.dumps(cell.to_dict()))
        ranks = []
        for local, r in enumerate(group.ranks):
            host = group.addresses[r] if group.addresses else HOST
            rdv = Rendezvous(r, cell.workers, host=host, ports=group.ports, device=rank_device(cell.device, local),
                             addresses=group.addresses, local_rank=local)
            write_json(tmp_path / f"rdv{local}.json", rdv.to_dict())
            ranks.append((["-m", "samenet.cell", "cell.json", f"row{local}.json", "--rank", f"rdv{local}.json"],
                          info.dp_env(rdv)))
        coordinator = group.addresses[0] if group.addresses else HOST
        helpers = info.dp_helpers(cell.workers, coordinator, group.ports) if group.helpers_here else []

        def read(local: int) -> dict | None:
            path = tmp_path / f"row{local}.json"
            return json.loads(path.read_text()) if path.exists() else None

        def failed(local: int, code: int):
            row = read(local)
            if row is not None and row.get("status") != "ok":
                return f"{row.get('status')}: {row.get('error', '')}", reported_at(tmp_path / f"row{local}.json")
            if row is None or code:
                return f"{describe_exit(code)} without a result" if row is None else describe_exit(code)
            return None

        result = launch(python, ranks, helpers, env, tmp_path, timeout, failed, first_rank=group.ranks[0],
                        loopback=group.loopback)
        rows = [read(local) for local in range(len(group.ranks))]
    load_after = os.getloadavg()[0]
    return merge_rank_rows(cell, info, rows, result, group.ranks[0]), result.wall_s, load_before, load_after


def reported_at(path: Path) -> float:
    """When a file was written, on the time.monotonic() clock."""
    return time.monotonic() - (time.time() - path.stat().st_mtime)


def merge_rank_rows(cell: Cell, info, rows: list[dict | None], result, first_rank: int = 0) -> dict:
    """One row of a data-parallel cell from the rows of the ranks this host ran.

    The step time of step k is the slowest rank's; global throughput counts every rank's
    samples over the window from the first rank's first timed start to the last rank's last
    end. A failure is the first failing rank's, with its error and log. Across hosts, each
    host's launcher makes its own row from its own ranks (``first_rank`` the first of them):
    every timed step ends in a barrier of the whole group, so the window is the group's.
    """
    from . import measure as m

    dp = info.data_parallel
    common = {"workers": cell.workers, "scaling": cell.scaling, "batch_per_worker": cell.per_worker_batch,
              "global_batch": cell.global_batch, "dp_engine": dp.engine, "launcher": dp.launcher,
              "transport": dp.transports.get(registry.split_device(cell.device)[0]), "dp_bn": dp.bn,
              "rank_pids": [r.get("pid") if r else None for r in rows]}
    if cell.hosts:
        common.update(nodes=len(cell.hosts), node_rank=cell.node_rank,
                      local_ranks=list(range(first_rank, first_rank + len(rows))))
    if result.failure is not None:
        role, reason = result.failure
        index = int(role.split()[1]) - first_rank if role.startswith("rank ") else None
        own = rows[index] if index is not None else None
        status = "timeout" if result.timed_out else (own or {}).get("status", "crash")
        outcome = next((o for o in result.ranks + result.helpers if o.role == role), None)
        base = own or next((r for r in rows if r), None) or {}
        row = {k: v for k, v in base.items() if k not in ("status", "error", "samples_ns", "step_start_ns")}
        row.update(common, status=status if status in ("error", "oom", "unsupported", "timeout") else "crash",
                   error=f"{role}: {reason}", failing_rank=role,
                   log_tail=outcome.log_tail if outcome else "",
                   ended=[f"{o.role}: {'killed by the launcher' if o.killed else 'exit ' + str(o.code)}"
                          for o in result.ranks + result.helpers])
        return row
    row = dict(rows[0])
    starts = np.array([r["step_start_ns"] for r in rows], dtype=np.int64)
    durations = np.array([r["samples_ns"] for r in rows], dtype=np.int64)
    ends = starts + durations
    slowest = durations.max(axis=0)
    row["samples_ns"] = slowest.tolist()
    row.update(m.summarize(slowest.tolist()))
    row["rank_step_median_s"] = [float(np.median(d)) / 1e9 for d in durations]
    window = (ends.max() - starts.min()) / 1e9
    row["window_s"] = float(window)
    row["global_samples_per_s"] = cell.global_batch * cell.iters / window if window > 0 else None
    median = row.get("step_median_s")
    if median:
        row["samples_per_s"] = cell.global_batch / median
        flops = 2 * row["macs_per_sample"] * 3 * cell.global_batch
        row["gflops_per_s"] = flops / median / 1e9
    ar = np.array([r["allreduce_samples_s"] for r in rows], dtype=np.float64).max(axis=0)
    row["allreduce_median_s"] = float(np.median(ar))
    row["allreduce_busbw_bytes_per_s"] = bus_bandwidth(row["grad_bytes"], cell.workers, row["allreduce_median_s"])
    peak = max(r["busbw_peak_bytes_per_s"] for r in rows)
    row["ring_model_s"] = ring_allreduce_s(row["grad_bytes"], cell.workers, peak)
    if median:
        row["comm_share"] = row["allreduce_median_s"] / median
    for key in ("peak_rss_mb", "rss_increase_mb", "peak_rss_steps_mb", "last_loss", "first_step_s", "build_s"):
        row[f"rank_{key}"] = [r.get(key) for r in rows]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
    row["peak_rss_sum_mb"] = sum(r["peak_rss_mb"] for r in rows)
    row["first_step_s"] = max(r["first_step_s"] for r in rows)
    row.pop("step_start_ns", None)
    row.pop("main_entry_unix", None)
    row.update(common)
    return row


def expand(backends: list[str], models: list[str], modes: list[str], batches: list[int], repeats: int = 1,
           **common) -> list[Cell]:
    """The cells of a sweep, in a stable order (backend fastest, so a partial sweep compares)."""
    cells = []
    for model in models:
        for batch in batches:
            for mode in modes:
                for r in range(repeats):
                    for b in backends:
                        cells.append(Cell(backend=b, model=model, mode=mode, batch=batch, repeat=r, **common))
    return cells


class _Progress:
    """A rich progress bar on a terminal; one line per cell otherwise (CI logs)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def begin(self, cell: Cell) -> None:
        if self.live:
            self.bar.update(self.task, description=cell.label())

    def end(self, cell: Cell, row: dict | None, why: str | None = None) -> None:
        self.done += 1
        if self.live:
            self.bar.advance(self.task)
            return
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        if row is None:
            what = why or "skipped (in the results; --force reruns, --retry-failed reruns failures)"
        elif row.get("status") == "ok":
            what = f"ok, {row['step_median_s'] * 1e3:.1f} ms/step"
        else:
            what = f"{row.get('status')}: {row.get('error', '')}"
        print(f"[{self.done}/{self.total}] {cell.label()}: {what} (about {left:.0f} s left)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            self.bar.stop()


FAILED = frozenset({"error", "crash", "timeout", "oom"})
INTERRUPTED = "interrupted"
"""The status of a cell stopped by Ctrl-C: recorded, and rerun by the next sweep (not settled)."""


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C during a cell: carries the cell's ``interrupted`` row for the sweep to write."""

    def __init__(self, row: dict):
        super().__init__(row.get("error"))
        self.row = row
"""Statuses a retry reruns: not ``ok``, nor ``unsupported`` (which a rerun cannot change)."""


class Executor:
    """Base of the executors: a context manager whose exit calls ``close``; subclasses give ``map``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Releases what the executor started (nothing here)."""


class LocalExecutor(Executor):
    """Cells as subprocesses of this machine; ``jobs`` at once for correctness cells only.

    The default executor of a sweep; samenet.executors has the Ray and Slurm ones, with the
    same ``map``.

    Args:
        jobs: How many non-timing cells may run at once (timing cells: always one).
    """

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise UsageError(f"--jobs: must be positive, got {jobs}")
        self.jobs = jobs

    def map(self, cells: list[Cell], python: Callable[[str], str], timeout: float, timing: bool = True,
            started: Started | None = None) -> Rows:
        """Yields ``(index in cells, row)`` as each cell ends."""
        started = started or (lambda cell: None)
        environment = sweep_environment()
        if timing or self.jobs == 1:
            for i, cell in enumerate(cells):
                started(cell)
                yield i, run_cell(cell, python(cell.backend), timeout, environment)
            return
        pool = ThreadPoolExecutor(self.jobs)
        try:
            running = {}
            for i, cell in enumerate(cells):
                started(cell)
                running[pool.submit(run_cell, cell, python(cell.backend), timeout, environment)] = i
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()
        finally:
            # An interrupted sweep must not go on to start the queued cells.
            pool.shutdown(wait=True, cancel_futures=True)


def settled_keys(store: Store, force: bool = False, retry_failed: bool = False) -> set[str]:
    """Keys of the cells a sweep skips: those in the store, less failures with ``retry_failed``."""
    if force:
        return set()
    rerun = FAILED | {INTERRUPTED} if retry_failed else {INTERRUPTED}
    return {key for key, status in store.statuses().items() if status not in rerun}


def sweep(cells: Iterable[Cell], store: Store, python: Callable[[str], str], timeout: float, force: bool = False,
          progress: bool = True, run_id: str | None = None, retry_failed: bool = False, executor=None,
          timing: bool = True) -> list[dict]:
    """Runs every cell not yet in the store; returns the rows of this sweep (new ones), in cell order.

    The executor (samenet.executors; default: local, one cell at a time) only maps cells to
    rows; this driver decides what runs and writes each row as it arrives, so resume, retry
    and force are the same whatever runs the cells.

    Args:
        force: Run every cell, whatever the store holds.
        retry_failed: Also run cells whose newest row's status is in FAILED.
        executor: Where the cells run (LocalExecutor, RayExecutor, SlurmExecutor).
        timing: The cells are timed (never two on the same cores); False for correctness
            work, which an executor may run side by side.
    """
    cells = list(cells)
    have = settled_keys(store, force, retry_failed)
    executor = executor or LocalExecutor()
    run_id = run_id or uuid.uuid4().hex[:12]
    bar = _Progress(len(cells), progress)
    todo = []
    for cell in cells:
        if cell.key() in have:
            bar.end(cell, None)
        else:
            todo.append(cell)
    rows: dict[int, dict] = {}
    claimed: set[str] = set()

    def keep(row: dict) -> None:
        row["run_id"] = run_id
        row.setdefault("executor", executor.name)
        row.setdefault("node", row.get("hostname"))
        store.write(row)
        if row.get("cell_key") in claimed:
            store.release(row["cell_key"])
            claimed.discard(row["cell_key"])

    def mine(batch: list[int]) -> list[int]:
        """The cells of ``batch`` this sweep claims: another sweep on the store may hold some,
        or have measured them since this one started."""
        out = []
        for i in batch:
            key = todo[i].key()
            if not store.claim(key):
                bar.end(todo[i], None, "skipped (another sweep on this store is running it)")
            elif key not in settled_keys(store, force=False, retry_failed=retry_failed) or force:
                claimed.add(key)
                out.append(i)
            else:
                store.release(key)
                bar.end(todo[i], None, "skipped (another sweep on this store measured it meanwhile)")
        return out

    # Claims are taken just before a cell runs where the executor runs one at a time, so that
    # two sweeps on one store split the cells; others are given all of theirs at once.
    one_by_one = isinstance(executor, LocalExecutor) and (timing or executor.jobs == 1)
    batches = [[i] for i in range(len(todo))] if one_by_one else [list(range(len(todo)))]
    try:
        for batch in batches:
            ours = mine(batch)
            for j, row in executor.map([todo[i] for i in ours], python, timeout, timing=timing, started=bar.begin):
                keep(row)
                rows[ours[j]] = row
                bar.end(todo[ours[j]], row)
    except CellInterrupted as stop:  # the cell Ctrl-C stopped is a row too; the sweep stops
        keep(stop.row)
        raise
    finally:
        bar.close()
        for key in claimed:
            store.release(key)
    return [rows[i] for i in sorted(rows)]


def with_defaults(cell: Cell) -> Cell:
    return replace(cell, threads=cell.threads or registry.default_threads())
