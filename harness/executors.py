"""Executors: where the cells of a sweep run (local processes, Ray tasks, Slurm jobs).

An executor only places cells and carries their rows back; what runs is always the same
``runner.run_cell`` (the backend's interpreter, ``-m samenet.cell``, one process per cell,
under its timeout), so isolation, timeouts and rows do not depend on the executor. The
driver's sweep (samenet.runner.sweep) writes every row to the one store, which keeps resume,
``--retry-failed`` and ``--force`` identical across executors.

Timing cells own their cores: the local executor runs them one at a time; on Ray each timing
cell also takes the node's one ``samenet-timing-slot``, so a node runs at most one at once; on
Slurm each timing cell's job asks for its node exclusively. Correctness cells (``timing`` False)
may share: ``LocalExecutor(jobs=N)`` runs N at once, Ray and Slurm as many as fit.

A task, worker, node or job lost on the way is a row with status ``crash`` whose error names
what was lost; the other cells go on. ray and submitit are imported here only, and only when
their executor is used: no framework env needs them, and the core runs without them.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from . import backend as registry
from .cell import Cell
from .errors import UsageError
from .env import sweep_environment
from .runner import Executor, LocalExecutor, Rows, Started, _finish_row, child_environment, run_cell

EXECUTORS = ("local", "ray", "slurm")
TIMING_SLOT = "samenet-timing-slot"
"""Ray resource a node declares once (``ray start --resources '{"samenet-timing-slot": 1}'``)."""
ENV_RESOURCE_SHARE = 0.001
"""Share of a node's ``samenet-env:<backend>`` resource one cell takes: the resource marks
that the node holds the env, it does not limit how many cells use it (declare it as 1)."""

def env_resource(backend: str) -> str:
    """The Ray resource of a node that holds the backend's env, e.g. ``samenet-env:torch``."""
    return f"samenet-env:{backend}"


def require(module: str, executor: str, extra: str):
    """Imports ray or submitit, or says in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--executor {executor} needs the '{module}' package: pip install 'samenet[{extra}]'") \
            from None


def lost_row(cell: Cell, python: str, status: str, error: str) -> dict:
    """The row of a cell whose task, worker, node or job was lost (no cell process reported)."""
    load = os.getloadavg()[0]
    row = _finish_row(cell, python, child_environment(cell), {"status": status, "error": error}, 0.0, load, load)
    # host_environment() above is the driver's: the node that ran the cell is unknown.
    row["node"] = None
    return row


def first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception (Ray's run on for a paragraph), and the node it names."""
    text = str(exc).strip()
    sentence = re.split(r"(?<=[a-z])\. |\n", text, maxsplit=1)[0].rstrip(".")
    node = re.search(r"node ID: ([0-9a-f]{12})", text)
    return f"{type(exc).__name__}: {sentence}".rstrip(": ") + (f"; node {node.group(1)}" if node else "")


def _ray_task(cell: Cell, python: str, timeout: float, environment: dict) -> dict:
    """The Ray task: the cell subprocess on whichever node Ray chose, and which node that was."""
    import ray

    row = run_cell(cell, python, timeout, environment)
    row["node_id"] = ray.get_runtime_context().get_node_id()
    return row


def ray_request(cell: Cell, timing: bool) -> dict:
    """The Ray resources of a cell: its cores, its GPUs, its backend's env, a timing slot."""
    kind, _ = registry.split_device(cell.device)
    resources = {env_resource(cell.backend): ENV_RESOURCE_SHARE}
    if timing:
        resources[TIMING_SLOT] = 1
    return {"num_cpus": cell.threads * cell.workers, "num_gpus": cell.workers if kind == "cuda" else 0,
            "resources": resources}


def _fits(request: dict, offered: dict) -> bool:
    wanted = {"CPU": request["num_cpus"], "GPU": request["num_gpus"], **request["resources"]}
    return all(offered.get(name, 0) >= amount for name, amount in wanted.items() if amount)


def forwarded_environment() -> dict[str, str]:
    """The driver's variables a Ray worker needs to run cells as the driver would."""
    from .env import ROOT

    env = {k: v for k, v in os.environ.items() if k.startswith("SAMENET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


class RayExecutor(Executor):
    """Cells as Ray tasks, one per cell, placed by their resources (ray_request).

    Each node declares the backend envs it holds and one timing slot, e.g.
    ``ray start --address HEAD:6379 --resources '{"samenet-env:torch": 1, "samenet-timing-slot": 1}'``.
    Interpreter paths are the driver's (python_for): every node holds the checkout and the
    envs at the same paths (a shared filesystem or the same image).

    Args:
        address: An existing cluster to join (``ray.init(address=...)``); None starts a Ray
            instance on 127.0.0.1 only, for this sweep, and shuts it down after.
    """

    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address
        self.ray = None
        self.connected = False

    def _start(self, cells: list[Cell]) -> None:
        self.ray = ray = require("ray", "ray", "ray")
        env = {"env_vars": forwarded_environment()}
        loopback = not self.address or self.address.rpartition(":")[0] in ("127.0.0.1", "localhost")
        if loopback:
            # Ray turns 127.0.0.1 into this machine's outward address (services.resolve_ip_for_localhost)
            # unless it thinks clusters are off: then the driver and a local instance stay on the
            # loopback, and nothing listens on any other address.
            from ray._private import ray_constants

            self._cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
        if self.address:
            ray.init(address=self.address, runtime_env=env, log_to_driver=False, configure_logging=False,
                     **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
        else:
            cores = max([registry.default_threads(), *(c.threads * c.workers for c in cells)])
            resources = {env_resource(b): 1 for b in {c.backend for c in cells}} | {TIMING_SLOT: 1}
            # address="local": a new instance, never an existing one found on this machine.
            ray.init(address="local", num_cpus=cores, resources=resources, include_dashboard=False,
                     _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=False, configure_logging=False)
        self.connected = True
        # No retries: a lost worker or node must become a row, not a silent rerun of a timing.
        self.task = ray.remote(max_retries=0)(_ray_task)

    def close(self) -> None:
        """Disconnects; a Ray instance started here is shut down with it."""
        if self.connected:
            self.ray.shutdown()
            self.connected = False
            if hasattr(self, "_cluster_flag"):
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = self._cluster_flag

    def map(self, cells: list[Cell], python: Callable[[str], str], timeout: float, timing: bool = True,
            started: Started | None = None) -> Rows:
        """Yields ``(index in cells, row)`` as each cell ends, in the order they end."""
        if not cells:
            return
        if not self.connected:
            self._start(cells)
        ray = self.ray
        started = started or (lambda cell: None)
        environment = sweep_environment()  # once, in the driver: the nodes run no git
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        running = {}
        for i, cell in enumerate(cells):
            request = ray_request(cell, timing)
            if not any(_fits(request, offered) for offered in nodes):
                yield i, lost_row(cell, python(cell.backend), "error",
                                  f"no node of the Ray cluster offers {_describe(request)} (a node declares an env "
                                  f"and the timing slot with ray start --resources)")
                continue
            started(cell)
            running[self.task.options(**request).remote(cell, python(cell.backend), timeout, environment)] = i
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i = running.pop(ref)
                cell = cells[i]
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # run_cell itself raised: a harness bug
                    row = lost_row(cell, python(cell.backend), "error", f"the Ray task raised {first_line(exc.cause)}")
                except ray.exceptions.RayError as exc:  # worker, node or object lost
                    row = lost_row(cell, python(cell.backend), "crash",
                                   f"lost on Ray: the worker or node running the cell died ({first_line(exc)})")
                yield i, row


def _describe(request: dict) -> str:
    parts = [f"{request['num_cpus']} CPUs"] + ([f"{request['num_gpus']} GPUs"] if request["num_gpus"] else [])
    return ", ".join(parts + sorted(request["resources"]))


def _slurm_task(cell: Cell, python: str, timeout: float, environment: dict) -> dict:
    """The Slurm job: the cell subprocess on the job's node, and which job that was."""
    row = run_cell(cell, python, timeout, environment)
    row["slurm_job_id"] = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    return row


def parse_minutes(text: str, option: str) -> int:
    """``90`` (minutes) or ``H:MM:SS`` -> whole minutes, rounded up."""
    try:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (parts[2] > 0)
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"{option}: expected minutes or H:MM:SS, got '{text}'") from None
    if minutes < 1:
        raise UsageError(f"{option}: must be at least one minute, got '{text}'")
    return minutes


class SlurmExecutor(Executor):
    """Cells as Slurm jobs through submitit, one job per cell.

    Args:
        folder: Where submitit keeps each job's pickles and logs.
        partition: ``--partition`` of every job.
        time_min: Time limit per job in minutes (default: the cell timeout plus 5 minutes).
        parameters: Further submitit ``slurm_*`` parameters (e.g. ``{"slurm_account": "x"}``).
        local: Run the jobs with submitit.LocalExecutor on this machine (tests; no Slurm).
        poll_s: Seconds between looks at the jobs' state.
    """

    name = "slurm"

    def __init__(self, folder: str | Path, partition: str | None = None, time_min: int | None = None,
                 parameters: dict | None = None, local: bool = False, poll_s: float = 1.0):
        self.folder, self.partition, self.time_min = Path(folder), partition, time_min
        self.parameters, self.local, self.poll_s = dict(parameters or {}), local, poll_s

    def _executor(self):
        submitit = require("submitit", "slurm", "slurm")
        if self.local:
            return submitit, submitit.LocalExecutor(folder=self.folder)
        if not shutil.which("sbatch"):
            raise UsageError("--executor slurm: no sbatch on PATH (run it where Slurm jobs can be submitted)")
        return submitit, submitit.AutoExecutor(folder=self.folder, cluster="slurm")

    def _parameters(self, cell: Cell, timeout: float, timing: bool) -> dict:
        kind, _ = registry.split_device(cell.device)
        params = {"timeout_min": self.time_min or int(timeout // 60) + 5, "name": f"samenet-{cell.backend}"}
        if kind == "cuda":
            params["gpus_per_node"] = cell.workers
        if not self.local:
            params.update(slurm_cpus_per_task=cell.threads * cell.workers, slurm_ntasks_per_node=1)
            if self.partition:
                params["slurm_partition"] = self.partition
            if timing:  # the node to itself: no other job on its cores while it is timed
                params["slurm_exclusive"] = True
            params.update(self.parameters)
        return params

    def map(self, cells: list[Cell], python: Callable[[str], str], timeout: float, timing: bool = True,
            started: Started | None = None) -> Rows:
        """Yields ``(index in cells, row)`` as each cell's job ends."""
        if not cells:
            return
        submitit, executor = self._executor()
        started = started or (lambda cell: None)
        environment = sweep_environment()  # once, in the driver: the jobs run no git
        # On this machine (LocalExecutor) timing cells cannot be kept apart by Slurm: one at a time.
        one_at_a_time = self.local and timing
        jobs: dict = {}
        for i, cell in enumerate(cells):
            executor.update_parameters(**self._parameters(cell, timeout, timing))
            started(cell)
            jobs[executor.submit(_slurm_task, cell, python(cell.backend), timeout, environment)] = i
            if one_at_a_time:
                yield from self._collect(jobs, cells, python, submitit)
        yield from self._collect(jobs, cells, python, submitit)

    def _collect(self, jobs: dict, cells: list[Cell], python: Callable[[str], str], submitit) -> Rows:
        """Yields the rows of ``jobs`` (job -> index) as they end, until none is left."""
        while jobs:
            finished = [job for job in jobs if job.done()]
            if not finished:
                time.sleep(self.poll_s)
                continue
            for job in finished:
                i = jobs.pop(job)
                cell = cells[i]
                try:
                    row = job.result()
                except submitit.core.utils.UncompletedJobError:  # killed, preempted, node failure, time limit
                    state = str(job.state)
                    status = {"TIMEOUT": "timeout", "OUT_OF_MEMORY": "oom"}.get(state.split()[0], "crash")
                    row = lost_row(cell, python(cell.backend), status,
                                   f"lost on Slurm: job {job.job_id} ended without a result (state {state})")
                except Exception as exc:  # run_cell itself raised: a harness bug
                    row = lost_row(cell, python(cell.backend), "error",
                                   f"Slurm job {job.job_id} raised {first_line(exc)}")
                yield i, row
