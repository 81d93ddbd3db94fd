"""The regression check: noise-aware speed thresholds, exact counts, machine classes, exit codes."""

from __future__ import annotations

import json

import pytest

from samenet.check import FORMAT, Thresholds, compare, summarize
from samenet.cli import main
from samenet.results import Store, load

MACHINE = "Test CPU / 2 cpus"


def bench_row(step_s=0.010, spread=0.01, backend="torch", model="lenet5", mode="train", repeat=0, peak=400.0,
              params=61706, machine=MACHINE, status="ok", **kw):
    """A bench row as the runner writes it; ``spread`` is the relative IQR of its timed steps."""
    row = {"backend": backend, "model": model, "mode": mode, "batch": 16, "input": "1x32x32", "device": "cpu",
           "precision": "fp32", "exec_mode": "eager", "options": {}, "threads": 2, "cpu_settings": "tuned",
           "warmup": 3, "iters": 10, "repeat": repeat, "seed": 0, "cell_key": f"{backend}-{model}-{mode}",
           "status": status, "machine_class": machine, "framework_version": "1.0", "spec_hash": "abc",
           "params_trainable": params, "params_non_trainable": 0, "macs_per_sample": 416520}
    if status == "ok":
        row.update(step_median_s=step_s, step_iqr_s=step_s * spread, step_p10_s=step_s * (1 - spread),
                   step_p90_s=step_s * (1 + spread), samples_per_s=16 / step_s, gflops_per_s=1.0, peak_rss_mb=peak)
    row.update(kw)
    return row


def write(root, rows, kind="bench"):
    store = Store(root, kind)
    for r in rows:
        store.write(r)
    return root


def check(tmp_path, base_rows, run_rows, *options, kind="bench"):
    """Writes a baseline from ``base_rows``, then checks ``run_rows`` against it; returns the exit code."""
    base, run = tmp_path / "base", tmp_path / "run"
    write(base, base_rows, kind)
    write(run, run_rows, kind)
    baseline = tmp_path / "baseline.json"
    assert main(["check", "--results", str(base), "--kind", kind, "--baseline", str(baseline),
                 "--update-baseline"]) == 0
    return main(["check", "--results", str(run), "--kind", kind, "--baseline", str(baseline), *options])


def repeats(step_s, spread, n=3, **kw):
    return [bench_row(step_s, spread, repeat=i, **kw) for i in range(n)]


def test_same_run_passes(tmp_path, capsys):
    assert check(tmp_path, repeats(0.010, 0.01), repeats(0.010, 0.01)) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_30_percent_slowdown_with_small_spread_is_a_regression(tmp_path, capsys):
    assert check(tmp_path, repeats(0.010, 0.01), repeats(0.013, 0.01)) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "step time" in out and "+30.0%" in out


def test_tolerance_grows_with_the_spread(tmp_path):
    # 3% slower: a regression under a 1% tolerance when the steps are steady...
    assert check(tmp_path / "steady", repeats(0.010, 0.002), repeats(0.0103, 0.002), "--speed-tolerance", "1") == 1
    # ...but not when the measurements themselves spread by 20%.
    assert check(tmp_path / "noisy", repeats(0.010, 0.20), repeats(0.0103, 0.20), "--speed-tolerance", "1") == 0


def test_3_percent_change_with_large_spread_passes_by_default(tmp_path):
    assert check(tmp_path, repeats(0.010, 0.15), repeats(0.0103, 0.15)) == 0


def test_between_repeat_spread_widens_the_tolerance_and_medians_resist_one_outlier(tmp_path):
    steady = [bench_row(s, 0.005, repeat=i) for i, s in enumerate((0.010, 0.010, 0.010))]
    one_outlier = [bench_row(s, 0.005, repeat=i) for i, s in enumerate((0.010, 0.0101, 0.030))]
    assert check(tmp_path, steady, one_outlier) == 0  # median of repeats: 0.0101
    entry = summarize({"bench": load(tmp_path / "run")})[0]
    assert entry["repeats"] == 3 and entry["step_median_s"] == pytest.approx(0.0101)
    assert entry["step_rel_spread"] > 0.5  # the outlier repeat widens the between-run spread


def test_speedup_is_reported_not_failed(tmp_path, capsys):
    assert check(tmp_path, repeats(0.010, 0.01), repeats(0.007, 0.01)) == 0
    assert "improved" in capsys.readouterr().out


def test_parameter_count_change_is_a_regression_whatever_the_machine(tmp_path, capsys):
    assert check(tmp_path, repeats(0.010, 0.01), repeats(0.010, 0.01, params=61707, machine="other / 8 cpus")) == 1
    out = capsys.readouterr().out
    assert "params_trainable" in out and "+1" in out


def test_different_machine_class_skips_timings_and_memory(tmp_path, capsys):
    other = repeats(0.020, 0.01, machine="Other CPU / 8 cpus", peak=480.0)  # 2x slower, +20% RSS
    assert check(tmp_path, repeats(0.010, 0.01), other) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "different machine class" in out and "Other CPU / 8 cpus" in out


def test_memory_growth_beyond_its_threshold_is_a_regression(tmp_path, capsys):
    assert check(tmp_path / "a", repeats(0.010, 0.01), repeats(0.010, 0.01, peak=480.0)) == 1  # +20%
    assert "peak RSS MB" in capsys.readouterr().out
    assert check(tmp_path / "b", repeats(0.010, 0.01), repeats(0.010, 0.01, peak=480.0),
                 "--memory-tolerance", "25") == 0


def test_a_cell_that_now_fails_is_a_regression(tmp_path, capsys):
    # as the runner writes a cell that died early: exec mode, input and options left to the defaults
    died = bench_row(status="oom", error="out of memory", exec_mode=None, input=None, options=[])
    assert check(tmp_path, repeats(0.010, 0.01, n=1), [died]) == 1
    assert "oom" in capsys.readouterr().out


def test_missing_baseline_is_a_one_line_usage_error(tmp_path, capsys):
    write(tmp_path, repeats(0.010, 0.01))
    assert main(["check", "--results", str(tmp_path), "--baseline", "no-such-baseline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no baseline") and "--update-baseline" in err and err.count("\n") == 1


def test_bad_baseline_file_and_empty_results_are_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": []}))
    write(tmp_path / "r", repeats(0.010, 0.01))
    assert main(["check", "--results", str(tmp_path / "r"), "--baseline", str(bad)]) == 2
    assert "not a samenet baseline" in capsys.readouterr().err
    assert main(["check", "--results", str(tmp_path / "empty"), "--baseline", str(bad)]) == 2
    assert "nothing to check" in capsys.readouterr().err


def test_update_keeps_other_configurations(tmp_path):
    baseline = tmp_path / "b.json"
    write(tmp_path / "one", [bench_row(model="lenet5")])
    write(tmp_path / "two", [bench_row(model="alexnet", params=1)])
    for d in ("one", "two"):
        assert main(["check", "--results", str(tmp_path / d), "--baseline", str(baseline), "--update-baseline"]) == 0
    data = json.loads(baseline.read_text())
    assert data["format"] == FORMAT
    assert sorted(e["key"]["model"] for e in data["entries"]) == ["alexnet", "lenet5"]


def test_accuracy_and_parity_compared_tightly():
    import pandas as pd

    def entries(acc, status, ratio):
        train = pd.DataFrame([{"backend": "torch", "model": "lenet5", "data": "digits", "epochs": 2, "batch": 32,
                               "lr": [0.05, 0.05], "seed": 0, "status": "ok", "final_test_acc": acc}])
        parity = pd.DataFrame([{"backend": "torch", "model": "lenet5", "status": status, "fwd_worst_ratio": ratio,
                                "train_worst_ratio": ratio / 2}])
        return summarize({"train": train, "parity": parity})

    base = entries(0.90, "pass", 0.01)
    verdicts = lambda run: {(f.kind, f.quantity): f.verdict for f in compare(base, run, Thresholds())}  # noqa: E731
    assert set(verdicts(entries(0.90, "pass", 0.012)).values()) == {"ok"}
    assert verdicts(entries(0.893, "pass", 0.01))[("train", "final test accuracy")] == "REGRESSION"  # -0.7 pp
    assert verdicts(entries(0.90, "fail", 3.0))[("parity", "status")] == "REGRESSION"
    assert verdicts(entries(0.90, "pass", 0.5))[("parity", "error / tolerance")] == "REGRESSION"


def test_other_backends_of_the_baseline_are_ignored_missing_cells_reported(tmp_path, capsys):
    base = [*repeats(0.010, 0.01, n=1), *repeats(0.010, 0.01, n=1, backend="tf"),
            *repeats(0.010, 0.01, n=1, mode="infer")]
    assert check(tmp_path, base, repeats(0.010, 0.01, n=1)) == 0
    out = capsys.readouterr().out
    assert "not run: torch/lenet5" in out and "tf/" not in out


@pytest.mark.parametrize("entry, reason", [
    (3, "$.entries[0]: expected an object"),
    ({"kind": "bench"}, "$.entries[0]: expected an object"),
    ({"kind": "bench", "key": {}, "step_median_s": "fast"}, "$.entries[0].step_median_s: expected a number"),
    ({"kind": "bench", "key": {}, "peak_rss_mb": [1]}, "$.entries[0].peak_rss_mb: expected a number"),
])
def test_a_malformed_baseline_entry_is_a_one_line_usage_error(entry, reason, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": FORMAT, "entries": [entry]}))
    write(tmp_path / "r", repeats(0.010, 0.01))
    assert main(["check", "--results", str(tmp_path / "r"), "--baseline", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err


def test_one_process_sides_tolerate_a_process_drift_but_not_a_2x_slowdown(tmp_path, capsys, monkeypatch):
    """The case seen: one quiet process each, 1.51 against 1.92 ms (+27 %), within-process IQR
    small; the drift between fresh processes is larger than that IQR."""
    monkeypatch.setenv("COLUMNS", "1000")
    one = lambda s: [bench_row(s, 0.02)]  # noqa: E731
    assert check(tmp_path / "drift", one(0.00151), one(0.00192), "--verbose") == 0
    out = capsys.readouterr().out
    assert "one process on the baseline and run side" in out and "assumed 15%" in out
    assert check(tmp_path / "2x", one(0.00151), one(0.00302)) == 1


def test_measured_between_process_spread_replaces_the_assumed_one(tmp_path):
    # Three processes a side that agree within 1 %: a 20 % slowdown is a regression.
    tight = lambda s: [bench_row(s * f, 0.01, repeat=i) for i, f in enumerate((0.995, 1.0, 1.005))]  # noqa: E731
    assert check(tmp_path / "tight", tight(0.010), tight(0.012)) == 1
    # Three that scatter by 30 %: the same slowdown is within what fresh processes do.
    loose = lambda s: [bench_row(s * f, 0.01, repeat=i) for i, f in enumerate((0.8, 1.0, 1.4))]  # noqa: E731
    assert check(tmp_path / "loose", loose(0.010), loose(0.012)) == 0
