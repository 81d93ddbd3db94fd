"""The parity command's process handling: the timeout is per model, and a hung or dead child
costs only its model's row (samenet.parity.run_backend), with stand-in interpreters."""

from __future__ import annotations

import sys
import textwrap

from samenet.parity import run_backend

# Stand-in for a backend interpreter: `python -m samenet.parity CONFIG OUT` writes one row per
# model after DELAY seconds, but hangs on (or dies at) the model named HANG (DIE).
CHILD = textwrap.dedent("""\
    #!{python}
    import json, os, sys, time
    config, out = json.load(open(sys.argv[3])), sys.argv[4]
    for model in config["models"]:
        if model == {hang!r}:
            time.sleep(60)
        if model == {die!r}:
            print("segfault-like death", flush=True)
            os._exit(139)
        time.sleep({delay})
        json.dump({{"backend": "torch", "model": model, "status": "pass", "reason": ""}},
                  open(os.path.join(out, config["files"][model]), "w"))
    """)


def interpreter(tmp_path, delay=0.0, hang=None, die=None):
    path = tmp_path / "python"
    path.write_text(CHILD.format(python=sys.executable, delay=delay, hang=hang, die=die))
    path.chmod(0o755)
    return str(path)


def test_timeout_is_per_model_not_per_process(tmp_path):
    # 3 models at 1 s each take 3 s: past a 2.5 s timeout in all, within it for each (the
    # 1.5 s margin absorbs the child's start-up on a loaded machine; 0.6 s against 1.2 s flaked)
    rows = run_backend("torch", ["a", "b", "c"], interpreter(tmp_path, delay=1.0), True, True, 1, timeout=2.5)
    assert [(r["model"], r["status"]) for r in rows] == [("a", "pass"), ("b", "pass"), ("c", "pass")]


def test_a_hung_model_is_a_crash_row_and_the_others_still_run(tmp_path):
    rows = run_backend("torch", ["a", "b", "c"], interpreter(tmp_path, hang="b"), True, True, 1, timeout=2.0)
    assert [(r["model"], r["status"]) for r in rows] == [("a", "pass"), ("b", "crash"), ("c", "pass")]
    assert "timeout after 2 s" in rows[1]["reason"]


def test_a_dead_child_is_a_crash_row_with_its_output(tmp_path):
    seen = []
    rows = run_backend("torch", ["a", "b", "c"], interpreter(tmp_path, die="a"), True, True, 1, timeout=10,
                       on_row=seen.append)
    assert [(r["model"], r["status"]) for r in rows] == [("a", "crash"), ("b", "pass"), ("c", "pass")]
    assert "exit code 139" in rows[0]["reason"] and "segfault-like death" in rows[0]["log_tail"]
    assert [r["model"] for r in seen] == ["a", "b", "c"]


def test_cases_only_caches_what_every_backend_env_reads(tmp_path, monkeypatch):
    """``parity --cases-only`` runs no backend and leaves the cases the backend envs look up:
    a forward case and one training case per BN-variance convention, then the data-parallel
    cases per (BN semantics, convention) the data-parallel backends declare."""
    from samenet import backend as registry
    from samenet.cli import main

    monkeypatch.setenv("SAMENET_CACHE", str(tmp_path))
    assert main(["parity", "--cases-only", "--models", "lenet5"]) == 0
    conventions = {i.bn_variance == "unbiased" for i in map(registry.get, registry.names()) if i.capabilities.train}
    assert len(list((tmp_path / "conformance").glob("lenet5-*.npz"))) == 1
    assert len(list((tmp_path / "training").glob("lenet5-*.npz"))) == len(conventions) == 2
    assert main(["parity", "--cases-only", "--models", "lenet5", "--workers", "2"]) == 0
    dp = {(i.data_parallel.bn, i.bn_variance) for i in map(registry.get, registry.names())
          if i.capabilities.data_parallel and i.data_parallel is not None}
    assert len(list((tmp_path / "dp").glob("lenet5-*.npz"))) == len(dp) > 1


# Stand-in interpreter that records, per model, its process, its thread budget and when it ran.
RECORDING_CHILD = textwrap.dedent("""\
    #!{python}
    import json, os, sys, time
    config, out = json.load(open(sys.argv[3])), sys.argv[4]
    for model in config["models"]:
        start = time.time()
        time.sleep(0.5)
        json.dump({{"backend": config["backend"], "model": model, "status": "pass", "reason": "", "pid": os.getpid(),
                   "child_threads": config["threads"], "start": start, "end": time.time()}},
                  open(os.path.join(out, config["files"][model]), "w"))
    """)


def test_parity_jobs_deal_a_backends_models_to_processes_that_run_side_by_side(tmp_path, monkeypatch, capsys):
    from samenet.cli import main

    stub = tmp_path / "python"
    stub.write_text(RECORDING_CHILD.format(python=sys.executable))
    stub.chmod(0o755)
    models = ["lenet5", "alexnet", "resnet18", "mobilenet_v2"]
    rc = main(["parity", "--jobs", "2", "--threads", "2", "--backends", "torch", "--models", ",".join(models),
               "--python", f"torch={stub}", "--results", str(tmp_path / "results")])
    assert rc == 0, capsys.readouterr().err
    from samenet.results import Store

    rows = list(Store(str(tmp_path / "results"), "parity").rows())
    assert sorted(r["model"] for r in rows) == sorted(models) and {r["jobs"] for r in rows} == {2}
    by_pid: dict[int, list[dict]] = {}
    for r in rows:
        by_pid.setdefault(r["pid"], []).append(r)
    assert len(by_pid) == 2, "two parity processes for one backend with --jobs 2"
    assert {r["child_threads"] for r in rows} == {1}, "each of 2 jobs gets half of --threads 2"
    first, second = ([min(r["start"] for r in g), max(r["end"] for r in g)] for g in by_pid.values())
    assert first[0] < second[1] and second[0] < first[1], "the two processes' runs overlap in time"


def test_parity_units_cover_every_model_once_and_balance_the_work():
    from samenet import zoo
    from samenet.commands_run import parity_units

    models = ["lenet5", "alexnet", "vgg11", "resnet18", "resnet50", "mobilenet_v2", "squeezenet1_1"]
    assert parity_units(["torch", "tf"], models, 1) == [("torch", models), ("tf", models)]
    units = parity_units(["torch"], models, 3)
    assert len(units) == 3 and sorted(m for _, g in units for m in g) == sorted(models)
    assert all(g == [m for m in models if m in g] for _, g in units), "a group keeps the order asked for"
    cost = [sum(zoo.load(m).macs for m in g) for _, g in units]
    assert cost == sorted(cost, reverse=True), "costliest unit first"
    biggest = max(zoo.load(m).macs for m in models)
    assert cost[0] <= max(biggest, sum(cost) / 3 + biggest), cost
    assert parity_units(["torch", "tf"], ["lenet5", "resnet18"], 2, workers=2) == [
        ("torch", ["lenet5"]), ("torch", ["resnet18"]), ("tf", ["lenet5"]), ("tf", ["resnet18"])]
