"""The runner: one process per cell, every outcome a row, atomic store, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from samenet.cell import Cell
from samenet.cli import main
from samenet.errors import UsageError
from samenet.results import Store, load
from samenet.runner import python_for, run_cell, sweep

HERE = Path(__file__).resolve().parent
FAKES = ",".join(f"{n}=fake_backends:INFO_{n.upper().replace('-', '_')}"
                 for n in ("segfault", "hang", "oom", "killed", "exits", "slow", "infer-only"))


@pytest.fixture(autouse=True)
def fake_backends(monkeypatch):
    monkeypatch.setenv("SAMENET_BACKENDS", FAKES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def cell(backend="numpy", mode="infer", **kw):
    return Cell(backend=backend, model="lenet5", mode=mode, batch=4, warmup=1, iters=3, threads=1, **kw)


def test_ok_row_has_the_protocol_figures():
    row = run_cell(cell(), sys.executable, timeout=120)
    assert row["status"] == "ok", row.get("error_detail") or row.get("log_tail")
    for key in ("import_s", "build_s", "weights_s", "first_step_s", "step_median_s", "step_p10_s", "step_p90_s",
                "step_mean_s", "samples_per_s", "gflops_per_s", "peak_rss_mb", "rss_after_import_mb",
                "rss_increase_mb", "spec_hash", "framework_version", "python", "cpu_model", "hostname",
                "git_revision", "machine_class", "load_avg_before"):
        assert row.get(key) is not None, key
    assert len(row["samples_ns"]) == 3
    assert row["step_p10_s"] <= row["step_median_s"] <= row["step_p90_s"]
    assert row["heavy_modules"] == []  # the cell process never imports pandas or matplotlib
    assert row["thread_env"]["OMP_NUM_THREADS"] == "1"
    assert row["input"] == "1x32x32" and row["exec_mode"] == "eager"
    assert isinstance(row["cpu_isa"], str)  # may be empty (no /proc/cpuinfo), never missing


def test_ok_row_splits_the_cells_overhead():
    """Process start, the steps and the exit are each accounted for, and add up to the wall time."""
    row = run_cell(cell(), sys.executable, timeout=120)
    assert row["status"] == "ok"
    assert "main_entry_unix" not in row
    for key in ("startup_s", "cell_s", "exit_s", "steps_s"):
        assert row[key] >= -0.01, key  # two clocks (spawn, main entry) read a few ms apart
    assert row["steps_s"] >= row["first_step_s"] + sum(row["samples_ns"]) / 1e9
    assert row["startup_s"] + row["cell_s"] + row["exit_s"] == pytest.approx(row["wall_s"], abs=0.05)
    assert row["import_s"] + row["build_s"] + row["steps_s"] < row["cell_s"]


def test_an_inference_build_has_no_optimiser_and_refuses_to_train():
    from samenet import backend as registry, zoo
    from samenet.backend import BuildConfig
    from samenet.data import synthetic_batch

    ir = zoo.load("lenet5")
    b = registry.get("numpy").create()
    b.build(ir, BuildConfig(optimizer=None))
    x, y = synthetic_batch(ir, 2, 0)
    batch = b.to_device(x, y)
    assert b.infer_step(batch)[0].shape == (2, 10)
    with pytest.raises(RuntimeError, match="built for inference only"):
        b.train_step(batch)


def test_unsupported_is_a_row_with_its_reason():
    row = run_cell(cell(precision="amp-bf16"), sys.executable, timeout=120)
    assert row["status"] == "unsupported"
    assert "precision amp-bf16 not supported" in row["error"]


def test_train_cell_reports_the_loss():
    row = run_cell(cell(mode="train"), sys.executable, timeout=120)
    assert row["status"] == "ok" and 0 < row["last_loss"] < 10


@pytest.mark.parametrize("backend, status, text", [
    ("segfault", "crash", "SIGSEGV"),
    ("oom", "oom", "MemoryError"),
    ("killed", "crash", "SIGKILL"),  # a kill -9, not the kernel's: its oom_kill count stays
    ("exits", "crash", "exit code 3"),
])
def test_failures_become_rows(backend, status, text):
    row = run_cell(cell(backend), sys.executable, timeout=120)
    assert row["status"] == status
    assert text in row["error"]
    assert row["import_s"] is not None if status == "oom" and backend == "oom" else True


def test_every_row_states_its_input_in_one_form():
    from dataclasses import replace

    default, asked = run_cell(cell("segfault"), sys.executable, timeout=120), run_cell(
        replace(cell("segfault"), input=(1, 28, 28)), sys.executable, timeout=120)
    ok = run_cell(cell(), sys.executable, timeout=120)
    assert (default["status"], asked["status"], ok["status"]) == ("crash", "crash", "ok")
    assert default["input"] == ok["input"] == "1x32x32" and asked["input"] == "1x28x28"


def test_timeout_kills_the_cell():
    start = time.perf_counter()
    row = run_cell(cell("hang"), sys.executable, timeout=5)
    assert row["status"] == "timeout" and "5 s" in row["error"]
    assert time.perf_counter() - start < 60


def test_sweep_goes_on_after_failures_and_resumes(tmp_path):
    store = Store(tmp_path)
    cells = [cell("segfault"), cell(), cell(precision="amp-bf16")]
    rows = sweep(cells, store, lambda b: sys.executable, timeout=120, progress=False)
    assert [r["status"] for r in rows] == ["crash", "ok", "unsupported"]
    assert len(list(store.rows())) == 3
    assert sweep(cells, store, lambda b: sys.executable, timeout=120, progress=False) == []  # resumed: all there
    again = sweep(cells[1:2], store, lambda b: sys.executable, timeout=120, force=True, progress=False)
    assert len(again) == 1 and len(list(store.rows())) == 4


def test_the_sweeps_environment_is_captured_once(tmp_path, monkeypatch):
    from samenet import env

    calls = []
    monkeypatch.setattr(env, "git_revision", lambda: calls.append(1) or ("feedc0de", False))
    env.sweep_environment.cache_clear()
    try:
        rows = sweep([cell(), cell("segfault"), cell(precision="amp-bf16")], Store(tmp_path),
                     lambda b: sys.executable, timeout=120, progress=False)
    finally:
        env.sweep_environment.cache_clear()
    assert len(calls) == 1
    assert [(r["git_revision"], r["git_dirty"]) for r in rows] == [("feedc0de", False)] * 3
    given = run_cell(cell(precision="amp-bf16"), sys.executable, 120, {"git_revision": "0ther", "git_dirty": True})
    assert (given["git_revision"], given["git_dirty"]) == ("0ther", True)


def test_retry_failed_reruns_only_cells_whose_newest_row_failed(tmp_path):
    store = Store(tmp_path)
    crashed, recovered, unsupported = cell("segfault"), cell(), cell(precision="amp-bf16")
    for c, status, day in ((crashed, "crash", 1), (recovered, "timeout", 1), (recovered, "ok", 2),
                           (unsupported, "unsupported", 1)):
        store.write({**c.to_dict(), "cell_key": c.key(), "status": status, "timestamp": f"2026-01-0{day}T00:00:00+00:00"})
    cells = [crashed, recovered, unsupported]
    assert sweep(cells, store, lambda b: sys.executable, timeout=120, progress=False) == []
    rows = sweep(cells, store, lambda b: sys.executable, timeout=120, progress=False, retry_failed=True)
    assert [(r["backend"], r["status"]) for r in rows] == [("segfault", "crash")]
    assert store.statuses()[recovered.key()] == "ok"


def test_killing_a_sweep_loses_no_finished_cell(tmp_path):
    cmd = [sys.executable, "-m", "samenet", "run", "--backends", "slow", "--models", "lenet5", "--modes", "infer",
           "--batch-sizes", "1,2,3,4,5", "--warmup", "0", "--iters", "2", "--threads", "1",
           "--results", str(tmp_path), "--quiet"]
    log = tmp_path / "sweep.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    store = Store(tmp_path)
    deadline = time.time() + 120
    while len(list(store.rows())) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    exited = proc.poll()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(store.rows())
    assert exited is None, f"the sweep ended by itself (exit {exited}): {log.read_text()[-2000:]}"
    assert 2 <= len(done) < 5, log.read_text()[-2000:]
    assert all(r["status"] == "ok" for r in done)
    for path in store.dir.iterdir():  # every file is a whole row or an ignored temporary
        if path.suffix == ".json":
            json.loads(path.read_text())
    assert main(cmd[3:-1] + ["--quiet"]) == 0  # resume: only the missing cells run
    assert len(list(store.rows())) == 5


def test_load_gives_a_dataframe(tmp_path):
    store = Store(tmp_path)
    sweep([cell(), cell(precision="amp-bf16")], store, lambda b: sys.executable, timeout=120, progress=False)
    df = load(tmp_path)
    assert len(df) == 2
    assert {"backend", "model", "mode", "status", "step_median_s", "peak_rss_mb", "timestamp"} <= set(df.columns)
    assert set(df["status"]) == {"ok", "unsupported"}


def test_run_command_prints_a_table(tmp_path, capsys):
    rc = main(["run", "--backends", "numpy", "--models", "lenet5", "--modes", "infer", "--batch-sizes", "2",
               "--iters", "3", "--warmup", "1", "--results", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0
    assert "lenet5" in out.out and "numpy" in out.out and "median of 3 timed steps" in out.out
    assert "[1/1] numpy eager lenet5 infer b2: ok" in out.err or "numpy lenet5 infer b2: ok" in out.err


@pytest.mark.parametrize("argv, message", [
    (["--models", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--backends", "tensorflw"], "unknown value 'tensorflw'"),
    (["--modes", "fly"], "unknown value 'fly'"),
    (["--batch-sizes", "0"], "expected positive integers"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--exec-mode", "warp"], "has no mode 'warp'"),
    (["--option", "memory_format=round"], "no backend among numpy has option"),
    (["--precision", "fp8"], "unknown 'fp8'"),
])
def test_bad_run_options_are_one_line(argv, message, capsys, tmp_path):
    rc = main(["run", "--backends", "numpy", "--results", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_backend_without_framework_or_env(monkeypatch):
    monkeypatch.setenv("SAMENET_BACKENDS", "ghost=fake_backends:INFO_GHOST")
    with pytest.raises(UsageError, match="no .tox/ghost env"):
        python_for("ghost")


def test_all_backends_are_the_frameworks_not_the_numpy_reference():
    from samenet import backend as registry
    from samenet.cli import build_parser
    from samenet.commands_run import cells_from_args

    assert "numpy" in registry.names() and "numpy" not in registry.framework_names()
    args = build_parser().parse_args(["run", "--backends", "all", "--models", "lenet5"])
    backends = {cell.backend for cell in cells_from_args(args)}
    assert backends == set(registry.framework_names()) >= {"torch", "tf", "mxnet", "paddle", "mindspore"}
    args = build_parser().parse_args(["run", "--backends", "numpy", "--models", "lenet5"])
    assert {cell.backend for cell in cells_from_args(args)} == {"numpy"}  # still there by name


def test_inference_only_backend_measures_infer_and_declines_train():
    infer = run_cell(cell(backend="infer-only"), sys.executable, timeout=120)
    assert infer["status"] == "ok", infer.get("error_detail") or infer.get("log_tail")
    train = run_cell(cell(backend="infer-only", mode="train"), sys.executable, timeout=120)
    assert train["status"] == "unsupported" and "no training (inference-only backend)" in train["error"], train


def test_conformance_suite_accepts_an_inference_only_backend():
    """Its training tests skip on the declared capability; forward tests run and pass."""
    env = {**os.environ, "SAMENET_BACKENDS": FAKES}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    selected = "relu or set_lr or float64"
    out = subprocess.run([sys.executable, "-m", "pytest", "tests/conformance", "--backend", "infer-only", "-q",
                          "-rs", "-p", "no:cacheprovider", "-k", selected, "--training-models", "lenet5"],
                         capture_output=True, text=True, cwd=HERE.parents[1], env=env, timeout=600)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:]
    assert "failed" not in summary and "xfail" not in summary and " passed" in summary and " skipped" in summary
    assert "does not declare the train capability" in out.stdout


def test_a_sigkill_is_oom_only_when_the_kernels_oom_kill_count_rises(monkeypatch):
    from samenet import runner

    counts = iter([7, 8])  # before the cell, after it: the kernel OOM-killed a process meanwhile
    monkeypatch.setattr(runner, "oom_kills", lambda: next(counts))
    row = run_cell(cell("killed"), sys.executable, timeout=120)
    assert row["status"] == "oom" and "out-of-memory killer" in row["error"], row["error"]


def test_the_kernels_oom_kill_count_is_read():
    from pathlib import Path

    from samenet.runner import oom_kills

    assert isinstance(oom_kills(), int) or not Path("/proc/vmstat").exists()


def _sweep_of_slow_cells(tmp_path, batches="1,2"):
    """A sweep of cells of 11 one-second steps each: a cell killed at its start would live on
    well past the tests' 5 s unless something ends it."""
    cmd = [sys.executable, "-m", "samenet", "run", "--backends", "slow", "--models", "lenet5", "--modes", "infer",
           "--batch-sizes", batches, "--warmup", "0", "--iters", "10", "--threads", "1",
           "--results", str(tmp_path), "--quiet"]
    log = open(tmp_path / "sweep.log", "wb")
    return cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def _running_cells(proc) -> list:
    """The sweep's cell processes, once one runs (psutil.Process each)."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        kids = [p for p in psutil.Process(proc.pid).children(recursive=True) if "samenet.cell" in " ".join(p.cmdline())]
        if kids:
            return kids
        time.sleep(0.1)
    raise AssertionError("no cell process started within 60 s")


def _rows_per_key(store) -> dict:
    counts: dict = {}
    for r in store.rows():
        counts.setdefault(r["cell_key"], []).append(r["status"])
    return counts


def test_a_sweep_killed_by_sigkill_leaves_no_cell_running(tmp_path):
    cmd, proc, log = _sweep_of_slow_cells(tmp_path)
    cells = _running_cells(proc)
    proc.kill()  # the parent alone: no finally of it runs
    proc.wait()
    log.close()
    gone, alive = psutil.wait_procs(cells, timeout=5)
    assert not alive, f"cell processes outlived their sweep by 5 s: {[p.pid for p in alive]}"
    assert main(cmd[3:]) == 0  # the rerun completes
    counts = _rows_per_key(Store(tmp_path))
    assert len(counts) == 2 and all(v == ["ok"] for v in counts.values()), counts


def test_ctrl_c_ends_the_running_cell_records_it_and_a_rerun_measures_it(tmp_path):
    cmd, proc, log = _sweep_of_slow_cells(tmp_path)
    cells = _running_cells(proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground group; the cell has its own session
    assert proc.wait(timeout=30) == 130
    log.close()
    gone, alive = psutil.wait_procs(cells, timeout=5)
    assert not alive, "the interrupted cell runs on"
    rows = list(Store(tmp_path).rows())
    assert [r["status"] for r in rows][-1] == "interrupted", [r["status"] for r in rows]
    assert main(cmd[3:]) == 0
    counts = _rows_per_key(Store(tmp_path))
    assert len(counts) == 2 and all(v[-1] == "ok" for v in counts.values()), counts
    assert sum(v.count("ok") for v in counts.values()) == 2, "every cell measured once"


def test_a_ctrl_c_as_the_cell_starts_is_not_lost(monkeypatch):
    """The race CI once hit: SIGINT after the cell's exec, before Popen returns."""
    from samenet.runner import CellInterrupted

    real, started = subprocess.Popen, []

    def popen_then_ctrl_c(*args, **kwargs):
        proc = real(*args, **kwargs)
        if not started and "samenet.cell" in args[0]:  # the cell only, not what the row's capture starts
            started.append(proc)
            os.kill(os.getpid(), signal.SIGINT)  # delivered here unless held back
            time.sleep(0.2)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen_then_ctrl_c)
    try:
        run_cell(replace(cell("slow"), warmup=0, iters=10), sys.executable, timeout=120)
    except CellInterrupted as stop:
        assert stop.row["status"] == "interrupted"
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C came before the runner held the cell: no row")
    else:
        pytest.fail("the Ctrl-C was ignored")
    finally:
        alive = [p for p in started if p.poll() is None]
        for p in alive:
            os.killpg(p.pid, signal.SIGKILL)
    assert started and not alive, "the cell runs on"


def test_two_sweeps_on_one_store_split_the_cells(tmp_path):
    cmd = [sys.executable, "-m", "samenet", "run", "--backends", "slow", "--models", "lenet5", "--modes", "infer",
           "--batch-sizes", "1,2,3,4", "--warmup", "0", "--iters", "2", "--threads", "1",
           "--results", str(tmp_path), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    rows = list(Store(tmp_path).rows())
    counts = _rows_per_key(Store(tmp_path))
    assert len(counts) == 4 and all(v == ["ok"] for v in counts.values()), f"a cell measured twice: {counts}"
    assert len({r["run_id"] for r in rows}) == 2, "both sweeps measured some of the cells"
    assert not list((Store(tmp_path).dir / ".claims").iterdir()), "claims are released"


def test_a_claim_whose_process_died_is_taken_over(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (store.dir / ".claims").mkdir(parents=True)
    import socket

    (store.dir / ".claims" / "k1.claim").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                                "time": time.time()}))
    assert store.claim("k1"), "the claim of a dead process is stale"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (store.dir / ".claims" / "k2.claim").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                                    "time": time.time()}))
        assert not store.claim("k2"), "a live process's claim holds"
    finally:
        other.kill()
        other.wait()
