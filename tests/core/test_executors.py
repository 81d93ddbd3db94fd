"""Executors: local (--jobs), Ray (a two-node cluster on 127.0.0.1), Slurm (submitit's LocalExecutor).

Each executor gives the same cell keys and statuses as the local one; a lost Ray node or
submitit job is a crash row and the sweep goes on. One Ray cluster serves the whole module,
and every process it starts ends with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from samenet.cell import Cell
from samenet.cli import main
from samenet.executors import TIMING_SLOT, LocalExecutor, RayExecutor, SlurmExecutor, env_resource, ray_request
from samenet.results import Store
from samenet.runner import sweep

HERE = Path(__file__).resolve().parent
FAKES = ",".join(f"{n}=fake_backends:INFO_{n.upper().replace('-', '_')}" for n in ("segfault", "slow", "infer-only"))
RAY_PROCESSES = ("raylet", "gcs_server")


def register_fakes(monkeypatch):
    monkeypatch.setenv("SAMENET_BACKENDS", FAKES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(autouse=True)
def fake_backends(monkeypatch):
    register_fakes(monkeypatch)


def cell(backend="numpy", batch=4, **kw):
    return Cell(**{"backend": backend, "model": "lenet5", "mode": "infer", "batch": batch, "warmup": 1, "iters": 3,
                   "threads": 1, **kw})


def python(backend):
    return sys.executable


# Two backends that measure and one that crashes: the statuses every executor must reproduce.
CELLS = [cell("numpy"), cell("infer-only"), cell("segfault")]


def outcome(rows):
    return sorted((r["cell_key"], r["status"]) for r in rows)


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # module scope: the autouse fixture has not run yet
        register_fakes(patch)
        return sweep(CELLS, Store(tmp_path_factory.mktemp("local")), python, timeout=120, progress=False)


def ray_processes(since: float) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["create_time"] >= since and any(n in (p.info["name"] or "") for n in RAY_PROCESSES):
            found.append(p)
    return found


def assert_no_ray_left(since: float) -> None:
    deadline = time.time() + 20
    while ray_processes(since) and time.time() < deadline:
        time.sleep(0.2)
    assert not ray_processes(since), [p.info for p in ray_processes(since)]


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and one worker node, both on 127.0.0.1; only the worker holds the 'slow' env."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    since = time.time() - 1
    flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False  # keep 127.0.0.1 as given
    envs = {env_resource(b): 1 for b in ("numpy", "infer-only", "segfault")}
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=2, resources={**envs, TIMING_SLOT: 1}, node_ip_address="127.0.0.1",
                         include_dashboard=False)
        worker = cluster.add_node(num_cpus=2, resources={**envs, env_resource("slow"): 1, TIMING_SLOT: 1},
                                  node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = flag
        assert_no_ray_left(since)


def test_local_jobs_run_correctness_cells_side_by_side_and_timing_cells_alone(tmp_path):
    cells = [cell("slow", batch=b, warmup=0, iters=1) for b in (1, 2)]  # a second of sleep per step
    start = time.perf_counter()
    rows = sweep(cells, Store(tmp_path / "side"), python, 120, progress=False, timing=False,
                 executor=LocalExecutor(jobs=2))
    side_by_side = time.perf_counter() - start
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["batch"] for r in rows] == [1, 2]
    assert side_by_side < 0.85 * sum(r["wall_s"] for r in rows)  # they overlapped
    cells = [cell("numpy", batch=b) for b in (1, 2)]
    start = time.perf_counter()
    rows = sweep(cells, Store(tmp_path / "timed"), python, 120, progress=False, executor=LocalExecutor(jobs=2))
    assert time.perf_counter() - start >= sum(r["wall_s"] for r in rows)  # one after the other
    assert {(r["executor"], r["node"]) for r in rows} == {("local", rows[0]["hostname"])}


def test_ray_sweep_gives_the_local_keys_and_statuses(ray_cluster, local_rows, tmp_path):
    cluster, _ = ray_cluster
    store = Store(tmp_path)
    with RayExecutor(cluster.address) as executor:
        rows = sweep(CELLS, store, python, timeout=120, progress=False, executor=executor)
        assert outcome(rows) == outcome(local_rows)
        assert {r["executor"] for r in rows} == {"ray"} and all(r["node_id"] and r["node"] for r in rows)
        # Resume and retry: the driver's store decides, as locally.
        assert sweep(CELLS, store, python, timeout=120, progress=False, executor=executor) == []
        again = sweep(CELLS, store, python, timeout=120, progress=False, executor=executor, retry_failed=True)
    assert [(r["backend"], r["status"]) for r in again] == [("segfault", "crash")]


def test_ray_requests_cores_gpus_env_and_the_timing_slot():
    assert ray_request(cell("numpy", threads=3), timing=True) == {
        "num_cpus": 3, "num_gpus": 0, "resources": {"samenet-env:numpy": 0.001, TIMING_SLOT: 1}}
    dp = Cell(backend="torch", model="lenet5", mode="train", batch=8, device="cuda", threads=2, workers=2)
    assert ray_request(dp, timing=False) == {"num_cpus": 4, "num_gpus": 2, "resources": {"samenet-env:torch": 0.001}}


def test_ray_cell_no_node_can_take_is_an_error_row(ray_cluster, tmp_path):
    cluster, _ = ray_cluster
    with RayExecutor(cluster.address) as executor:
        rows = sweep([cell("numpy", threads=64)], Store(tmp_path), python, 120, progress=False, executor=executor)
    assert rows[0]["status"] == "error" and "no node of the Ray cluster offers 64 CPUs" in rows[0]["error"]


def test_run_command_on_a_ray_cluster(ray_cluster, tmp_path, capsys):
    cluster, _ = ray_cluster
    rc = main(["run", "--executor", "ray", "--ray-address", cluster.address, "--backends", "numpy,infer-only",
               "--models", "lenet5", "--modes", "infer", "--batch-sizes", "2", "--warmup", "0", "--iters", "2",
               "--threads", "1", "--results", str(tmp_path), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = list(Store(tmp_path).rows())
    assert sorted((r["backend"], r["status"], r["executor"]) for r in rows) == [
        ("infer-only", "ok", "ray"), ("numpy", "ok", "ray")]


def test_slurm_jobs_ask_for_the_cells_cores_gpus_and_an_exclusive_node_to_time(tmp_path):
    executor = SlurmExecutor(tmp_path, partition="cpu", time_min=30, parameters={"slurm_account": "lab"})
    timed = executor._parameters(cell("numpy", threads=4), timeout=600, timing=True)
    assert timed == {"timeout_min": 30, "name": "samenet-numpy", "slurm_cpus_per_task": 4, "slurm_ntasks_per_node": 1,
                     "slurm_partition": "cpu", "slurm_exclusive": True, "slurm_account": "lab"}
    dp = Cell(backend="torch", model="lenet5", mode="train", batch=8, device="cuda", threads=2, workers=2)
    shared = SlurmExecutor(tmp_path)._parameters(dp, timeout=600, timing=False)
    assert shared == {"timeout_min": 15, "name": "samenet-torch", "gpus_per_node": 2, "slurm_cpus_per_task": 4,
                      "slurm_ntasks_per_node": 1}


def _cell_processes(backend: str) -> list[psutil.Process]:
    """This machine's cell processes of a backend (found by their cell.json)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "samenet.cell" in cmd:
            try:
                config = json.loads(Path(cmd[cmd.index("samenet.cell") + 1]).read_text())
            except (OSError, ValueError, IndexError):
                continue
            if config["backend"] == backend:
                found.append(p)
    return found


def _end_orphans(processes: list[psutil.Process]) -> None:
    """Ends cell processes whose parent was killed (with its node or job), and their scratch folders."""
    for p in processes:
        folder = Path(p.info["cmdline"][-1]).parent
        try:
            p.send_signal(signal.SIGKILL)
            deadline = time.time() + 10
            # Ended once a zombie: reaping it is its new parent's part (here, this machine's init).
            while p.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
                time.sleep(0.05)
        except psutil.Error:  # gone
            pass
        shutil.rmtree(folder, ignore_errors=True)


def test_a_killed_ray_node_gives_a_crash_row_and_the_sweep_goes_on(ray_cluster, tmp_path):
    """Runs last of the Ray tests: it takes the worker node away."""
    cluster, worker = ray_cluster
    victim = cell("slow", warmup=0, iters=20)  # 20 s of steps: certainly still running when its node dies
    seen: list[psutil.Process] = []

    def kill_the_node_mid_cell():
        deadline = time.time() + 60
        while not seen and time.time() < deadline:
            seen.extend(_cell_processes("slow"))
            time.sleep(0.1)
        cluster.remove_node(worker, allow_graceful=False)

    killer = threading.Thread(target=kill_the_node_mid_cell)
    killer.start()
    try:
        with RayExecutor(cluster.address) as executor:
            rows = sweep([victim, cell("numpy")], Store(tmp_path), python, 120, progress=False, executor=executor)
    finally:
        killer.join()
        _end_orphans(seen)
    assert seen, "the slow cell never started"
    lost, other = rows
    assert lost["status"] == "crash" and lost["error"].startswith("lost on Ray"), lost
    print(lost["error"])
    assert lost["cell_key"] == victim.key() and lost["executor"] == "ray" and lost["node"] is None
    assert other["status"] == "ok"


def test_slurm_executor_on_submitit_local_gives_the_local_keys_and_statuses(local_rows, tmp_path):
    pytest.importorskip("submitit")
    with SlurmExecutor(tmp_path / "jobs", local=True, poll_s=0.1) as executor:
        rows = sweep(CELLS, Store(tmp_path), python, timeout=120, progress=False, executor=executor)
    assert outcome(rows) == outcome(local_rows)
    assert {r["executor"] for r in rows} == {"slurm"} and all(r["slurm_job_id"] for r in rows)


def test_a_killed_submitit_job_gives_a_crash_row(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # A lost job's result file cannot turn up late on a local disk: no 15 s wait for it (that is for NFS).
    monkeypatch.setattr(submitit.local.local.LocalJob, "_results_timeout_s", 0)
    seen: list[psutil.Process] = []

    def kill_the_job_mid_cell():
        deadline = time.time() + 60
        while not seen and time.time() < deadline:
            seen.extend(_cell_processes("slow"))
            time.sleep(0.1)
        for p in seen:  # the job's process is the cell's parent
            psutil.Process(p.ppid()).send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_the_job_mid_cell)
    killer.start()
    try:
        with SlurmExecutor(tmp_path / "jobs", local=True, poll_s=0.1) as executor:
            rows = sweep([cell("slow", warmup=0, iters=20), cell("numpy")], Store(tmp_path), python, 120,
                         progress=False, timing=False, executor=executor)
    finally:
        killer.join()
        _end_orphans(seen)
    assert seen, "the slow cell never started"
    assert rows[0]["status"] == "crash" and rows[0]["error"].startswith("lost on Slurm: job"), rows[0]
    assert rows[1]["status"] == "ok"


@pytest.mark.parametrize("argv, message", [
    (["--executor", "spark"], "invalid choice: 'spark'"),
    (["--jobs", "0"], "--jobs: must be positive"),
    (["--jobs", "2"], "--jobs: timing cells"),
    (["--executor", "ray", "--jobs", "2"], "--jobs: only with --executor local"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address: only with --executor ray"),
    (["--slurm-partition", "gpu"], "--slurm-partition: only with --executor slurm"),
    (["--executor", "slurm", "--slurm-time", "soon"], "--slurm-time: expected minutes or H:MM:SS"),
])
def test_bad_executor_options_are_one_line(argv, message, capsys, tmp_path):
    pytest.importorskip("submitit")
    rc = main(["run", "--backends", "numpy", "--models", "lenet5", "--results", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("executor, package", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_cluster_package_is_one_line(executor, package, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    rc = main(["run", "--backends", "numpy", "--models", "lenet5", "--results", str(tmp_path), "--executor", executor])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].endswith(f"--executor {executor} needs the '{package}' package: pip install 'samenet[{executor}]'")
