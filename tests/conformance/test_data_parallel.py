"""Data-parallel tier: 2 CPU ranks on the framework's own engine against the numpy oracle.

For a backend that declares the ``data_parallel`` capability: two ranks of 4 images each take
two SGD steps of LeNet-5 (no BatchNorm) and of ResNet-18 (BatchNorm, under the backend's
declared data-parallel BN semantics), and every rank's loss and parameters, BN running
statistics included, must equal the oracle's (samenet.dp_parity) at the conformance
tolerances. A measured data-parallel cell must give one row with the group's figures, and a
rank killed mid-run one row naming it, with every process of the group ended. The launcher's
other faults (an exception, a hang, a helper that dies) are tested framework-free in
tests/core/test_distributed.py.
"""

from __future__ import annotations

import sys

import psutil
import pytest

from samenet.cell import Cell
from samenet.distributed import FAULT_ENV
from samenet.dp_parity import DP_CONTROL_MODEL, DP_MODELS, case_errors, control_bn, dp_case, run_case
from samenet.runner import run_cell

_cases: dict = {}
_got: dict = {}  # (backend, model) -> (case, per-rank steps) of the parity test


@pytest.fixture
def dp_info(backend_info, requires):
    requires("data_parallel")
    return backend_info


@pytest.mark.parametrize("model", DP_MODELS)
def test_two_ranks_take_the_oracles_steps(dp_info, known_gap, model):
    known_gap(f"dp:{model}")
    bn = dp_info.data_parallel.bn
    key = (model, bn, dp_info.bn_variance)
    if key not in _cases:
        _cases[key] = dp_case(model, bn, bn_unbiased=dp_info.bn_variance == "unbiased")
    case = _cases[key]
    got, failure = run_case(dp_info.name, case, sys.executable, threads=1, timeout=600)
    assert not failure, f"{failure.get('error')}\n{failure.get('log_tail', '')[-1500:]}"
    _got[(dp_info.name, model)] = (case, got)
    errors = case_errors(case, got)
    assert not errors["problems"], errors["problems"][:4]


def test_the_other_bn_semantics_does_not_pass(dp_info, known_gap):
    """Negative control: the BN net's ranks must miss the oracle of the other batch statistics
    (per-rank against synchronised), else the BN check above could pass whatever the engine
    did with the statistics (e.g. every rank taking the global batch, or no rank communicating)."""
    import numpy as np

    model = DP_CONTROL_MODEL
    known_gap(f"dp:{model}")
    declared = dp_info.data_parallel.bn
    other = control_bn(declared)
    control = dp_case(model, other, bn_unbiased=dp_info.bn_variance == "unbiased")
    case, got = _got.get((dp_info.name, model), (None, None))
    if case is None or not np.array_equal(case.x, control.x):  # not run above, or another batch
        got, failure = run_case(dp_info.name, control, sys.executable, threads=1, timeout=600)
        assert not failure, f"{failure.get('error')}\n{failure.get('log_tail', '')[-1500:]}"
    problems = case_errors(control, got)["problems"]
    assert problems, f"{dp_info.name} (declared bn={declared}) also matches the bn={other} oracle"


def _no_children_left() -> list:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


class ListeningSockets:
    """Polls, while running, the listening sockets of this process's descendants."""

    def __init__(self):
        import threading

        self.seen: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for proc in psutil.Process().children(recursive=True):
                try:
                    for c in proc.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            self.seen.add((" ".join(proc.cmdline()[-4:]), c.laddr.ip, c.laddr.port))
                except (psutil.Error, OSError):
                    pass
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_a_data_parallel_cell_is_one_row_of_the_group(dp_info):
    cell = Cell(backend=dp_info.name, model="lenet5", mode="train", batch=4, workers=2, threads=1, warmup=1, iters=3)
    with ListeningSockets() as sockets:
        row = run_cell(cell, sys.executable, timeout=600)
    # Every process of the group, helpers included, listens on loopback only.
    assert sockets.seen, "no listening socket seen: the check saw nothing"
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip, _ in sockets.seen), sorted(sockets.seen)
    assert row["status"] == "ok", f"{row.get('error')}\n{row.get('log_tail', '')[-1500:]}"
    assert row["workers"] == 2 and row["global_batch"] == 8 and row["batch_per_worker"] == 4
    assert row["transport"] == dp_info.data_parallel.transports["cpu"]
    assert len(row["samples_ns"]) == 3 and len(row["rank_step_median_s"]) == 2
    assert row["step_median_s"] >= max(row["rank_step_median_s"]) * 0.999  # the slowest rank's
    assert row["grad_bytes"] == 4 * 61706 and row["allreduce_median_s"] > 0 and row["ring_model_s"] > 0
    assert not _no_children_left()


def test_a_killed_rank_gives_one_row_and_ends_the_group(dp_info, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:kill")
    cell = Cell(backend=dp_info.name, model="lenet5", mode="train", batch=4, workers=2, threads=1, warmup=1, iters=3)
    row = run_cell(cell, sys.executable, timeout=600)
    assert row["status"] == "crash", row
    assert row["error"].startswith("rank 1: ") and "SIGKILL" in row["error"], row["error"]
    assert not _no_children_left()


def _free_port_range(n: int) -> int:
    """A first port p with p..p+n-1 all free on 127.0.0.1 now."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def test_two_launchers_as_two_hosts_form_the_same_group_as_one(dp_info):
    """``--hosts`` on loopback: two launchers (node ranks 0 and 1, one rank each) must form the
    group one launcher forms with two ranks: the same per-rank losses, to the last bit."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    cell = Cell(backend=dp_info.name, model="lenet5", mode="train", batch=4, workers=2, threads=1, warmup=1, iters=3)
    one = run_cell(cell, sys.executable, timeout=600)
    assert one["status"] == "ok", f"{one.get('error')}\n{one.get('log_tail', '')[-1500:]}"
    port = _free_port_range(dp_info.data_parallel.ports)
    nodes = [replace(cell, hosts=("127.0.0.1", "127.0.0.1"), node_rank=n, rendezvous_port=port) for n in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda c: run_cell(c, sys.executable, timeout=600), nodes))
    for r in rows:
        assert r["status"] == "ok", f"node {r.get('node_rank')}: {r.get('error')}\n{r.get('log_tail', '')[-1500:]}"
    assert [r["node_rank"] for r in rows] == [0, 1] and [r["local_ranks"] for r in rows] == [[0], [1]]
    assert rows[0]["cell_key"] != rows[1]["cell_key"] and rows[0]["workers"] == 2 and rows[0]["global_batch"] == 8
    assert [r["rank_last_loss"][0] for r in rows] == one["rank_last_loss"]
    assert not _no_children_left()
