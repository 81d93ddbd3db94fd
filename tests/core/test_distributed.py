"""The data-parallel launcher and oracle, framework-free.

The launcher runs plain Python processes standing in for ranks and helpers: it must name the
first failure (a crash, a hang, a kill, a helper that dies), end every process it started and
every process those started, and keep to its timeout. The oracle must equal the one-process
oracle on the global batch for a network without BatchNorm, in every BN semantics, and must
not for a BatchNorm network (the negative control: otherwise the BN test proves nothing).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import psutil
import pytest

from samenet.distributed import Helper, free_ports, launch

OK = ["-c", "import time; time.sleep(0.2)"]
HANG = ["-c", "import time; time.sleep(1000)"]
CRASH = ["-c", "import sys, time; time.sleep(0.3); sys.exit(3)"]
KILL = ["-c", "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)"]
# A rank that starts a grandchild, then blocks (as a rank in a collective with a dead peer).
PARENT_OF_SLEEPER = ["-c", "import subprocess, sys, time; p = subprocess.Popen(['sleep', '1000']); "
                           "open('grandchild.pid', 'w').write(str(p.pid)); time.sleep(1000)"]


def run(tmp_path, ranks, helpers=(), timeout=30.0, grace=1.0, failed=None):
    return launch(sys.executable, [(argv, {}) for argv in ranks], list(helpers), dict(os.environ), tmp_path,
                  timeout, failed, grace)


def alive_children():
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def test_a_group_that_succeeds_has_no_failure(tmp_path):
    result = run(tmp_path, [OK, OK], [Helper("scheduler", HANG)])
    assert result.failure is None and not result.timed_out
    assert [o.code for o in result.ranks] == [0, 0]
    assert result.helpers[0].killed  # helpers end with the group
    assert not alive_children()


def test_a_crashed_rank_is_named_and_its_blocked_peer_ended(tmp_path):
    start = time.monotonic()
    result = run(tmp_path, [PARENT_OF_SLEEPER, CRASH])
    assert result.failure == ("rank 1", "exit code 3")
    assert result.ranks[0].killed and time.monotonic() - start < 10
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    # SIGKILL went to its whole session; the kernel ends it within moments (init reaps it).
    try:
        _, alive = psutil.wait_procs([psutil.Process(grandchild)], timeout=3)
    except psutil.NoSuchProcess:
        alive = []
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive_children()


def test_a_killed_rank_is_the_cause_not_the_peer_that_reports_it(tmp_path):
    # Rank 0 reports an error (a broken connection) after rank 1 died without a word.
    def failed(rank, code):
        return ("error: connection closed by peer", time.monotonic()) if rank == 0 else (
            f"killed ({code})" if code else None)

    result = run(tmp_path, [["-c", "import time, sys; time.sleep(0.6); sys.exit(1)"], KILL], failed=failed)
    assert result.failure[0] == "rank 1" and "-9" in result.failure[1]
    assert not alive_children()


def test_a_hanging_group_times_out_and_every_process_is_ended(tmp_path):
    start = time.monotonic()
    result = run(tmp_path, [HANG, HANG], [Helper("server 0", HANG)], timeout=1.5)
    assert result.timed_out and result.failure[0] == "all ranks"
    assert all(o.killed for o in result.ranks + result.helpers)
    assert time.monotonic() - start < 8
    assert not alive_children()


def test_a_helper_that_dies_early_fails_the_group(tmp_path):
    result = run(tmp_path, [HANG, HANG], [Helper("scheduler", CRASH)])
    assert result.failure == ("scheduler", "scheduler ended early (exit code 3)")
    assert not alive_children()


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _oracles(ir, workers=2, per_worker=2, seed=0):
    from samenet import conformance, init, probe
    from samenet.dp_parity import dp_oracle

    weights = probe.probe_weights(ir, seed)
    x = init._normal(conformance.stream(seed, "t"), (workers * per_worker, *ir.input_shape)).astype(np.float32)
    y = np.arange(workers * per_worker) % int(np.prod(ir.output_shape))
    single = conformance._oracle("t", ir, weights, x, y, 0, True, opt=conformance.PARITY_OPTIMIZER)
    return single, {bn: dp_oracle(ir, weights, x, y, workers, bn, conformance.PARITY_OPTIMIZER)
                    for bn in ("local", "broadcast", "mean", "sync")}


def _max_diff(single, steps):
    return max(float(np.abs(ranks[r][k].astype(np.float64) - want[k]).max())
               for ranks, want in zip(steps, single.steps) for r in range(len(ranks)) for k in want)


def test_without_batchnorm_every_semantics_is_the_global_batch_oracle():
    from samenet import zoo

    single, dp = _oracles(zoo.load_for_test("lenet5"))
    for bn, (losses, steps) in dp.items():
        assert _max_diff(single, steps) <= 1e-6, bn
        # The ranks' mean loss is the global batch's loss.
        assert np.mean(losses[0]) == pytest.approx(single.losses[0], rel=1e-12), bn


def test_with_batchnorm_the_semantics_differ_and_sync_is_the_global_batch():
    from samenet.conformance import op_case_ids, op_case_ir

    op, case = next((op, case) for case_id, op, case in op_case_ids() if case_id == "op:batchnorm/2d")
    ir = op_case_ir(op, case, for_training=True)
    single, dp = _oracles(ir)
    assert _max_diff(single, dp["sync"][1]) <= 1e-6
    diffs = {bn: _max_diff(single, dp[bn][1]) for bn in ("local", "broadcast", "mean")}
    assert min(diffs.values()) > 1e-4, diffs  # per-rank statistics are not the global batch's
    stats = [n for n, p in ir.params.items() if not p.trainable]
    last = {bn: dp[bn][1][-1] for bn in dp}
    # local: the ranks' running statistics differ; mean and sync: every rank holds the same.
    assert any(np.abs(last["local"][0][n] - last["local"][1][n]).max() > 1e-6 for n in stats)
    for bn in ("mean", "sync"):
        assert all(np.array_equal(last[bn][0][n], last[bn][1][n]) for n in stats), bn


def test_the_comparison_passes_the_oracle_and_catches_one_rank_off():
    from samenet.conformance import PARITY_OPTIMIZER, op_case_ids, op_case_ir
    from samenet import init, probe, conformance
    from samenet.dp_parity import DataParallelCase, RankSteps, case_errors, dp_oracle

    op, case = next((op, case) for case_id, op, case in op_case_ids() if case_id == "op:batchnorm/2d")
    ir = op_case_ir(op, case, for_training=True)
    weights = probe.probe_weights(ir, 0)
    x = init._normal(conformance.stream(0, "t"), (4, *ir.input_shape)).astype(np.float32)
    y = np.arange(4) % int(np.prod(ir.output_shape))
    losses, steps = dp_oracle(ir, weights, x, y, 2, "broadcast", PARITY_OPTIMIZER)
    c = DataParallelCase("t", ir, weights, x, y, 2, "broadcast", PARITY_OPTIMIZER, losses, steps)
    exact = [RankSteps([l[r] for l in losses], [s[r] for s in steps]) for r in range(2)]
    assert case_errors(c, exact)["problems"] == []
    # Rank 1 keeping its own running statistics (local) instead of rank 0's (broadcast).
    _, local = dp_oracle(ir, weights, x, y, 2, "local", PARITY_OPTIMIZER)
    wrong = [exact[0], RankSteps(exact[1].losses, [s[1] for s in local])]
    problems = case_errors(c, wrong)["problems"]
    assert problems and all(p.startswith("rank 1 step 2") for p in problems), problems


def test_a_backend_without_the_capability_gives_an_unsupported_row():
    from samenet.cell import Cell
    from samenet.runner import run_cell

    row = run_cell(Cell(backend="numpy", model="lenet5", mode="train", batch=2, workers=2), sys.executable, 60)
    assert row["status"] == "unsupported" and "no data-parallel" in row["error"]
    assert row["workers"] == 2 and row["cell_key"]


def test_one_process_cells_keep_their_keys():
    from samenet.cell import Cell

    cell = Cell(backend="torch", model="lenet5", mode="train", batch=16)
    assert "workers" not in cell.to_dict() and Cell.from_dict(cell.to_dict()) == cell
    assert Cell(backend="torch", model="lenet5", mode="train", batch=16, workers=2).key() != cell.key()


def test_one_host_cells_keep_their_keys_and_a_group_across_hosts_is_its_own_cell():
    from samenet.cell import Cell

    one = Cell(backend="torch", model="lenet5", mode="train", batch=16, workers=2)
    assert "hosts" not in one.to_dict() and "rendezvous_port" not in one.to_dict()
    two = [Cell(backend="torch", model="lenet5", mode="train", batch=16, workers=2, hosts=("a", "b"), node_rank=n,
                rendezvous_port=p) for n, p in ((0, 29500), (0, 29600), (1, 29500))]
    assert Cell.from_dict(two[0].to_dict()) == two[0]
    assert two[0].key() != one.key(), "two hosts are another measurement"
    assert two[0].key() == two[1].key(), "the port is where the group met, not what it measured"
    assert two[0].key() != two[2].key(), "each host's row is its own"


def test_a_group_across_hosts_splits_its_ranks_and_agrees_on_ports():
    from samenet.distributed import group_of

    here = group_of(4, 2)
    assert here.ranks == (0, 1, 2, 3) and not here.addresses and here.helpers_here and here.loopback
    first, second = (group_of(4, 3, ("10.0.0.1", "10.0.0.2"), n, 29500) for n in (0, 1))
    assert first.ranks == (0, 1) and second.ranks == (2, 3)
    assert first.addresses == second.addresses == ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2")
    assert first.ports == second.ports == (29500, 29501, 29502)
    assert first.helpers_here and not second.helpers_here, "helpers start on rank 0's host only"
    assert not first.loopback and group_of(2, 1, ("127.0.0.1", "127.0.0.1"), 1, 29500).loopback


@pytest.mark.parametrize("backend", ["torch", "tf", "mxnet", "paddle", "mindspore", "keras-jax"])
def test_every_engine_is_told_where_the_other_hosts_are(backend):
    """Framework-free: each backend's rank environment for rank 2 of 4 on the second of two
    hosts names rank 0's host as the coordinator and keeps no loopback-only setting."""
    from samenet import backend as registry
    from samenet.distributed import Rendezvous

    info = registry.get(backend)
    addresses = ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2")
    rdv = Rendezvous(2, 4, host="10.0.0.2", ports=tuple(range(29500, 29500 + info.data_parallel.ports)),
                     addresses=addresses, local_rank=0)
    env = info.dp_env(rdv)
    text = " ".join(f"{k}={v}" for k, v in env.items())
    assert "=lo" not in text and "127.0.0.1" not in text, env
    if backend == "torch":
        assert rdv.coordinator == "10.0.0.1" and env == {}  # init_method reads rdv.coordinator
    else:
        assert "10.0.0.1" in text, f"{backend}: the coordinator's address is not in {env}"
    if backend == "tf":
        import json

        workers = json.loads(env["TF_CONFIG"])["cluster"]["worker"]
        assert workers == ["10.0.0.1:29500", "10.0.0.1:29501", "10.0.0.2:29502", "10.0.0.2:29503"]
    if backend == "paddle":
        assert env["PADDLE_CURRENT_ENDPOINT"] == "10.0.0.2:29502" and env["PADDLE_LOCAL_RANK"] == "0"
    if backend == "mxnet":
        assert env["DMLC_PS_ROOT_URI"] == "10.0.0.1" and env["DMLC_NODE_HOST"] == "10.0.0.2"
    one_host = info.dp_env(Rendezvous(1, 2, ports=rdv.ports[:info.data_parallel.ports]))
    assert "10.0.0" not in " ".join(one_host.values())
