"""Data-parallel runs: N rank processes on the framework's own engine, plus its helper processes.

Framework-free. The parent picks free ports on 127.0.0.1, starts the backend's helper
processes (MXNet's ps-lite scheduler and servers, MindSpore's scheduler) and then one process
per rank, each in its own session, with the rendezvous in its environment
(``BackendInfo.dp_env``). It watches them all under one timeout. The first rank that fails
(an error row, a non-zero exit, a signal) is the run's failure; the others, blocked in a
collective, are then given a short grace and killed, helpers too. Whatever happens, every
process group started here is ended before :func:`launch` returns.

Within a rank (samenet.cell), each timed step runs between two barriers of the engine, so the
step time of the group is the slowest rank's; the clocks are ``perf_counter_ns`` (Linux's
CLOCK_MONOTONIC, one clock for all processes of a host), which also gives the window over which
global throughput counts every rank's samples.

Every process of a group on one host runs with harness/loopback_bind.c preloaded: a bind to
any address becomes a bind to loopback, so no engine listens beyond 127.0.0.1 (the conformance
tier checks every listening socket of a running group). A group across hosts (``group_of``
with ``hosts``; docs/data-parallel.md) has one launcher per host, each starting its share of
the ranks, on agreed ports, without the shim.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .lifetime import die_with_parent

HOST = "127.0.0.1"
"""Every rank, server and scheduler binds here: data-parallel runs never leave the host."""

SCALINGS = ("weak", "strong")
"""weak: the per-worker batch is fixed (the global batch grows with N); strong: the global batch is."""

FAILURE_GRACE_S = 5.0
"""After the first rank fails, how long the others get to report their own failure before they
are killed (a rank blocked in a collective on the failed one never returns by itself)."""

FAULT_ENV = "SAMENET_DP_FAULT"
"""Fault injection for the data-parallel tests: ``RANK:KIND`` with KIND crash (an exception),
exit (os._exit), hang (sleeps) or kill (SIGKILL to itself), after the first timed step."""


@dataclass(frozen=True)
class Rendezvous:
    """What one rank needs to join its group.

    Attributes:
        rank: This process's rank, 0..world-1.
        world: Number of ranks (workers).
        host: This rank's own address, the one it binds to (HOST on one host).
        ports: The group's ports, as many as the backend declares: free ones picked by the
            parent on one host; ``--rendezvous-port`` and the ports after it across hosts.
        device: The rank's device (``cpu``, or its own GPU ``cuda:<local rank>``).
        addresses: Every rank's address, in rank order, across hosts; empty on one host
            (every rank is on ``host``).
        local_rank: This rank's index among the ranks of its host (None: ``rank``).
    """

    rank: int
    world: int
    host: str = HOST
    ports: tuple[int, ...] = ()
    device: str = "cpu"
    addresses: tuple[str, ...] = ()
    local_rank: int | None = None

    def address(self, rank: int) -> str:
        """The address of rank ``rank`` (its host's)."""
        return self.addresses[rank] if self.addresses else self.host

    @property
    def coordinator(self) -> str:
        """The address of rank 0's host, where a group's single services listen (rendezvous
        store, coordinator, scheduler, parameter server)."""
        return self.address(0)

    @property
    def local(self) -> int:
        """This rank's index on its host (which CPUs or GPU of the host it takes)."""
        return self.rank if self.local_rank is None else self.local_rank

    @property
    def loopback(self) -> bool:
        """Every rank is on this host's loopback: engines are told to use ``lo`` only."""
        return all(is_loopback(self.address(r)) for r in range(self.world))

    def to_dict(self) -> dict:
        return asdict(self) | {"ports": list(self.ports), "addresses": list(self.addresses)}

    @classmethod
    def from_dict(cls, d: dict) -> "Rendezvous":
        return cls(**(d | {"ports": tuple(d.get("ports", ())), "addresses": tuple(d.get("addresses", ()))}))


def is_loopback(address: str) -> bool:
    return address == "localhost" or address.startswith("127.") or address == "::1"


@dataclass(frozen=True)
class Group:
    """Where the ranks of a data-parallel cell run, seen from one host's launcher.

    Attributes:
        ranks: The global ranks this host starts.
        addresses: Every rank's address in rank order (empty: every rank on this host).
        ports: The group's ports.
        helpers_here: This host starts the engine's helper processes (rank 0's host).
        loopback: Every process is on this host's loopback (the bind shim applies).
    """

    ranks: tuple[int, ...]
    addresses: tuple[str, ...]
    ports: tuple[int, ...]
    helpers_here: bool
    loopback: bool


def group_of(workers: int, n_ports: int, hosts: tuple[str, ...] = (), node_rank: int = 0,
             rendezvous_port: int = 0) -> Group:
    """The group of ``workers`` ranks as this host (``node_rank`` of ``hosts``) starts it.

    One host (``hosts`` empty): every rank here, on 127.0.0.1, free ports picked now. Several:
    ``workers`` split evenly over the hosts in order (host k runs ranks k*L..k*L+L-1), and the
    ports are ``rendezvous_port`` and the ones after it, the same on every host (no host can
    pick free ports for another).
    """
    if not hosts:
        return Group(tuple(range(workers)), (), free_ports(n_ports), True, True)
    per_host = workers // len(hosts)
    addresses = tuple(h for h in hosts for _ in range(per_host))
    ranks = tuple(range(node_rank * per_host, (node_rank + 1) * per_host))
    return Group(ranks, addresses, tuple(range(rendezvous_port, rendezvous_port + n_ports)), node_rank == 0,
                 all(is_loopback(h) for h in hosts))


@dataclass(frozen=True)
class Helper:
    """A helper process of a backend's engine (started before the ranks, ended after them).

    Attributes:
        role: What it is, for error messages (``scheduler``, ``server 0``).
        argv: Its arguments after the interpreter (``["-c", "import mxnet"]``).
        env: Variables added to the cell's environment.
    """

    role: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """How one process of a run ended.

    Attributes:
        role: ``rank N`` or a helper's role.
        code: Exit code (negative: killed by that signal); None if it was still running.
        killed: Ended by the launcher (after another's failure, a timeout, or at the end).
        ended_at: ``time.monotonic()`` when it was seen to end on its own.
        log_tail: The end of its output.
    """

    role: str
    code: int | None = None
    killed: bool = False
    ended_at: float | None = None
    log_tail: str = ""


@dataclass
class RunResult:
    """All processes of a data-parallel run, and what went wrong first.

    Attributes:
        ranks: One Outcome per rank.
        helpers: One Outcome per helper.
        timed_out: The run passed its timeout (every process was killed).
        failure: ``(role, reason)`` of the first failure, None when every rank succeeded.
        wall_s: Seconds from the first start to the last end.
    """

    ranks: list[Outcome]
    helpers: list[Outcome]
    timed_out: bool = False
    failure: tuple[str, str] | None = None
    wall_s: float = 0.0


def free_ports(n: int, host: str = HOST) -> tuple[int, ...]:
    """``n`` distinct ports free on ``host`` now (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def loopback_shim() -> str:
    """The LD_PRELOAD library that makes a bind() to any address a bind to loopback.

    Some engines listen on every interface whatever address they are given (Paddle's
    TCPStore, hard-coded; torch's rank 0 on [::]). Compiled once from loopback_bind.c with the
    system's C compiler, cached by content in the temporary folder.
    """
    import hashlib
    import shutil
    import tempfile

    src = Path(__file__).with_name("loopback_bind.c")
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"samenet-loopback-{tag}-{os.getuid()}.so"
    if not lib.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("data parallel needs a C compiler (cc) for the loopback bind shim")
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], check=True)
        os.replace(tmp, lib)
    return str(lib)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_exit(code: int) -> str:
    return f"killed by {_signal_name(code)}" if code < 0 else f"exit code {code}"


def launch(python: str, ranks: list[tuple[list[str], dict[str, str]]], helpers: list[Helper], env: dict[str, str],
           cwd: Path, timeout: float, failed: Callable[[int, int], str | None] | None = None,
           grace: float = FAILURE_GRACE_S, first_rank: int = 0, loopback: bool = True) -> RunResult:
    """Runs one data-parallel group to its end; never leaves a process behind.

    Args:
        python: The interpreter of every process.
        ranks: Per rank, its arguments after the interpreter and the variables it adds.
        helpers: The engine's helper processes, started first.
        env: The environment every process starts from.
        cwd: Working folder (logs go to ``cwd/<role>.log``).
        timeout: Seconds for the whole group.
        failed: ``(rank, exit code) -> reason`` for a rank that ended, or None if it succeeded
            (default: any non-zero exit is a failure). Lets the caller read the rank's row; a
            ``(reason, time.monotonic() of the report)`` pair marks a failure the rank reported
            itself, which ranks after any death without a report, then by time.
        grace: Seconds the others get after the first failure.
        first_rank: The global rank of ``ranks[0]`` (on a host after the first), for the roles.
        loopback: Preload the loopback bind shim (every process stays on 127.0.0.1); False
            for a group across hosts, whose engines must listen on the host's own address.
    """
    failed = failed or (lambda rank, code: describe_exit(code) if code else None)
    if loopback:
        env = env | {"LD_PRELOAD": ":".join(p for p in (loopback_shim(), env.get("LD_PRELOAD")) if p)}
    procs: list[tuple[Outcome, subprocess.Popen, Path]] = []
    start = time.monotonic()

    def spawn(role: str, argv: list[str], extra: dict[str, str]) -> None:
        log = cwd / (role.replace(" ", "_") + ".log")
        with open(log, "wb") as f:
            p = subprocess.Popen([python, *argv], env=env | extra, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=die_with_parent())
        procs.append((Outcome(role), p, log))

    result = RunResult([], [])
    try:
        for h in helpers:
            spawn(h.role, h.argv, h.env)
        for r, (argv, extra) in enumerate(ranks):
            spawn(f"rank {first_rank + r}", argv, extra)
        n_helpers = len(helpers)
        deadline, kill_at = start + timeout, None
        failures: list[tuple[int, float, str, str]] = []  # (reported, when, role, reason)
        while True:
            now = time.monotonic()
            running = 0
            for i, (out, p, _) in enumerate(procs):
                if out.code is not None:
                    continue
                code = p.poll()
                if code is None:
                    running += i >= n_helpers
                    continue
                out.code, out.ended_at = code, now
                if i >= n_helpers:
                    verdict = failed(i - n_helpers, code)
                else:  # a helper may only end after every rank has
                    verdict = None if all(o.code is not None for o, _, _ in procs[n_helpers:]) else \
                        (f"{out.role} ended early ({describe_exit(code)})", None)
                if verdict:
                    reason, reported_at = verdict if isinstance(verdict, tuple) else (verdict, None)
                    failures.append((reported_at is not None, reported_at or now, out.role, reason))
                    kill_at = kill_at or now + grace
            if not running:
                break
            if now >= deadline:
                result.timed_out = True
                break
            if kill_at is not None and now >= kill_at:
                break
            time.sleep(0.05)
        # The cause is a process that died without reporting (its peers then report a broken
        # connection), else the earliest report.
        if failures:
            _, _, role, reason = min(failures)
            result.failure = (role, reason)
        elif result.timed_out:
            result.failure = ("all ranks", f"no result within {timeout:.0f} s (killed)")
    finally:
        for out, p, _ in procs:
            if p.poll() is None:
                out.killed = True
            _kill_group(p)  # also ends anything a process started in its session
        for out, p, log in procs:
            code = p.wait()
            if out.code is None:
                out.code = code
            try:
                out.log_tail = log.read_text(errors="replace")[-3000:]
            except OSError:
                pass
        result.wall_s = time.monotonic() - start
    result.helpers = [o for o, _, _ in procs[:len(helpers)]]
    result.ranks = [o for o, _, _ in procs[len(helpers):]]
    return result


def inject_fault(rank: int, where: str) -> None:
    """Acts on FAULT_ENV (tests only): fails this rank the way it names, at ``where``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, kind = spec.partition(":")
    if int(target) != rank or where != "step":
        return
    if kind == "crash":
        raise RuntimeError(f"injected fault: rank {rank} crashed")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        time.sleep(10_000)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def time_collective(collective, barrier, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``collective()`` (which must end synchronised),
    after one untimed call, each started right after ``barrier()``."""
    collective()
    out = []
    for _ in range(iters):
        barrier()
        start = time.perf_counter()
        collective()
        out.append(time.perf_counter() - start)
    return out


def ring_allreduce_s(nbytes: int, world: int, bus_bytes_per_s: float) -> float:
    """The ring all-reduce model's time: 2 (N-1) / N * S / B."""
    return 2 * (world - 1) / world * nbytes / bus_bytes_per_s if world > 1 and bus_bytes_per_s else 0.0


def bus_bandwidth(nbytes: int, world: int, seconds: float) -> float:
    """Bus bandwidth (bytes/s) of an all-reduce of ``nbytes`` taking ``seconds`` (NCCL-tests' busbw)."""
    return 2 * (world - 1) / world * nbytes / seconds if seconds > 0 and world > 1 else 0.0


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
