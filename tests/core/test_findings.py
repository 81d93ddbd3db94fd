"""The zoo preset's cells, the literature's claims checked on hand-made rows, and the report's analysis."""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samenet import findings, report, zoo
from samenet.cli import build_parser, main
from samenet.commands_run import cells_from_args
from samenet.findings import FAILS, HOLDS, MIXED, UNDECIDED
from test_report import bench_row

# (GMACs, parameters) of three networks, about the zoo's
NETS = {"lenet5": (0.0004, 6.2e4), "googlenet": (1.5, 6.6e6), "vgg16": (15.5, 1.38e8)}


def zoo_rows(speed=None, memory=None, gflops=None, cells=(("infer", 1), ("infer", 16), ("train", 16)), **kw):
    """Bench rows of every backend in ``speed`` x NETS x cells.

    Args:
        speed: backend -> step time factor (larger: slower).
        memory: backend -> memory factor.
        gflops: model -> achieved GFLOP/s factor (default: the same for all).
    """
    speed = speed or {"torch": 1.0, "tf": 2.0}
    memory = memory or {}
    rows = []
    for backend, factor in speed.items():
        for model, (gmacs, params) in NETS.items():
            for mode, batch in cells:
                step = factor * batch * (gmacs + 0.01) / 10
                rows.append(bench_row(backend, model, mode, batch, step, macs_per_sample=gmacs * 1e9,
                                      params_trainable=params, params_non_trainable=0,
                                      rss_increase_mb=memory.get(backend, 1.0) * (100 + 10 * gmacs * batch),
                                      gflops_per_s=(gflops or {}).get(model, 1.0) * 10.0, **kw))
    return pd.DataFrame(rows)


def finding(rows, claim_id):
    return next(f for f in findings.evaluate(rows) if f.claim.id == claim_id)


def run_args(*argv):
    return build_parser().parse_args(["run", *argv])


# --- the preset -----------------------------------------------------------------------------

def test_zoo_preset_measures_every_spec_at_infer_1_and_16_and_train_16():
    cells = cells_from_args(run_args("--preset", "zoo", "--backends", "numpy"))
    counts = Counter((c.mode, c.batch) for c in cells)
    n = len(zoo.names())
    assert counts == {("infer", 1): n, ("infer", 16): n, ("train", 16): n}  # no train at batch 1
    assert {c.model for c in cells} == set(zoo.names())
    assert len({c.key() for c in cells}) == len(cells)
    # model by model: a partial sweep has whole networks
    models = [c.model for c in cells]
    assert models == sorted(models, key=models.index)


def test_zoo_preset_narrowed_by_models_and_repeated_per_backend():
    cells = cells_from_args(run_args("--preset", "zoo", "--backends", "numpy,torch", "--models", "lenet5,googlenet",
                                     "--repeats", "2"))
    assert len(cells) == 2 * 3 * 2 * 2  # models x cells x backends x repeats
    assert [c.label() for c in cells[:3]] == ["numpy lenet5 infer b1", "torch lenet5 infer b1",
                                              "numpy lenet5 infer b1 r1"]


def test_zoo_preset_rows_go_to_the_zoo_store(tmp_path):
    results = tmp_path / "results"
    assert main(["run", "--preset", "zoo", "--backends", "numpy", "--models", "lenet5", "--warmup", "0",
                 "--iters", "2", "--results", str(results), "--quiet"]) == 0
    from samenet.results import load

    rows = load(results, "zoo")
    assert sorted(zip(rows["mode"], rows["batch"])) == [("infer", 1), ("infer", 16), ("train", 16)]
    assert set(rows["status"]) == {"ok"} and not (results / "bench").exists()


@pytest.mark.parametrize("extra", [["--modes", "train"], ["--batch-sizes", "2"], ["--quick"]])
def test_zoo_preset_with_its_own_modes_or_batches_is_a_usage_error(extra, capsys):
    assert main(["run", "--preset", "zoo", "--backends", "numpy", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {extra[0]}: not with --preset zoo")


def test_unknown_preset_is_a_usage_error(capsys):
    assert main(["run", "--preset", "nope", "--backends", "numpy"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# --- the claims -----------------------------------------------------------------------------

def test_every_claim_is_data_with_a_source_and_always_gives_a_finding():
    ids = [c.id for c in findings.CLAIMS]
    assert len(set(ids)) == len(ids) >= 5
    assert all(c.text and c.source and callable(c.evaluate) for c in findings.CLAIMS)
    got = findings.evaluate(pd.DataFrame())
    assert [f.claim.id for f in got] == ids and {f.verdict for f in got} == {UNDECIDED}


def test_mxnet_memory_holds_fails_and_is_undecided_without_mxnet():
    speed = {"torch": 1.0, "tf": 1.0, "mxnet": 1.0}
    held = finding(zoo_rows(speed, memory={"mxnet": 0.5}), "mxnet_memory")
    assert held.verdict == HOLDS and "geometric mean 0.50x" in held.numbers and "18 of 18" in held.numbers
    assert held.holds_for and not held.fails_for
    # negative control: mxnet uses more
    failed = finding(zoo_rows(speed, memory={"mxnet": 1.5}), "mxnet_memory")
    assert failed.verdict == FAILS and "lower (by > 5%) in 0 of 18" in failed.numbers and failed.fails_for
    mixed = finding(zoo_rows(speed, memory={"mxnet": 0.5, "tf": 0.25}), "mxnet_memory")
    assert mixed.verdict == MIXED and "vs tf: geometric mean 2.00x" in mixed.numbers
    missing = finding(zoo_rows({"torch": 1.0, "tf": 2.0}), "mxnet_memory")
    assert (missing.verdict, missing.numbers) == (UNDECIDED, "no rows of mxnet")


def test_torch_faster_than_tf_and_keras_and_its_negative_control():
    held = finding(zoo_rows({"torch": 1.0, "tf": 2.0, "keras-jax": 1.5}), "torch_faster")
    assert held.verdict == HOLDS and "vs keras-jax: geometric mean 0.67x" in held.numbers
    failed = finding(zoo_rows({"torch": 2.0, "tf": 1.0}), "torch_faster")
    assert failed.verdict == FAILS and "geometric mean 2.00x" in failed.numbers
    tie = finding(zoo_rows({"torch": 1.0, "tf": 1.02}), "torch_faster")
    assert tie.verdict == FAILS and "within 5% in 9" in tie.numbers  # a tie is not "faster"
    assert finding(zoo_rows({"torch": 1.0, "mxnet": 2.0}), "torch_faster").numbers == \
        "no rows of tf, keras-torch or keras-jax"


def test_only_ok_rows_of_the_same_machine_class_are_compared():
    rows = zoo_rows({"torch": 1.0})
    other_machine = zoo_rows({"tf": 2.0}, machine_class="Other CPU / 64 cpus")
    f = finding(pd.concat([rows, other_machine]), "torch_faster")
    assert f.verdict == UNDECIDED and "no configuration" in f.numbers
    failed_rows = zoo_rows({"tf": 0.1}).assign(status="oom")
    f = finding(pd.concat([zoo_rows({"torch": 1.0, "tf": 2.0}), failed_rows]), "torch_faster")
    assert f.verdict == HOLDS  # the oom rows neither count nor hide the ok ones
    other_threads = zoo_rows({"tf": 2.0}, threads=1, cell_key="t1")
    assert finding(pd.concat([rows, other_threads]), "torch_faster").verdict == UNDECIDED


def test_keras_slow_compares_keras_torch_with_torch():
    held = finding(zoo_rows({"torch": 1.0, "keras-torch": 1.6, "tf": 0.5}), "keras_slow")
    assert held.verdict == HOLDS and "vs keras-torch: geometric mean 0.62x" in held.numbers
    assert "vs tf" not in held.numbers and "keras-jax" in held.note and "cannot decide" in held.note
    assert finding(zoo_rows({"torch": 1.0, "keras-torch": 0.8}), "keras_slow").verdict == FAILS
    missing = finding(zoo_rows({"torch": 1.0, "keras-jax": 3.0}), "keras_slow")
    assert (missing.verdict, missing.numbers) == (UNDECIDED, "no rows of keras-torch")


def test_vgg_heaviest_and_its_negative_control():
    held = finding(zoo_rows(), "vgg_heaviest")
    assert held.verdict == HOLDS and "parameters: a VGG is the largest in 1 of 1" in held.numbers
    assert "step time: a VGG is the largest in 6 of 6" in held.numbers
    assert "memory: a VGG is the largest in 6 of 6" in held.numbers
    # a heavier non-VGG network in the rows: heaviest by every measure, so the claim fails
    heavy = zoo_rows().replace({"model": {"vgg16": "vgg11", "googlenet": "monster"}})
    heavy.loc[heavy["model"] == "monster", ["params_trainable", "macs_per_sample", "step_median_s",
                                            "rss_increase_mb"]] *= 1000
    assert finding(heavy, "vgg_heaviest").verdict == FAILS
    no_vgg = zoo_rows()[lambda d: d["model"] != "vgg16"]
    assert finding(no_vgg, "vgg_heaviest").numbers == "no rows of a VGG network"


def test_googlenet_efficiency_says_what_timing_rows_cannot_decide():
    held = finding(zoo_rows(gflops={"googlenet": 2.0}), "googlenet_efficient")
    assert held.verdict == HOLDS and "6 of 6" in held.numbers
    assert "accuracy per operation" in held.note and "cannot decide" in held.note
    assert finding(zoo_rows(gflops={"vgg16": 2.0}), "googlenet_efficient").verdict == FAILS
    no_googlenet = zoo_rows()[lambda d: d["model"] != "googlenet"]
    assert finding(no_googlenet, "googlenet_efficient").verdict == UNDECIDED


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.2, 5.0), min_size=1, max_size=4))
def test_pairwise_verdict_follows_the_ratios(factors):
    """Per model a tf/torch factor: the verdict is holds iff every ratio is a win, does not hold iff none is."""
    rows = []
    models = list(NETS)[:len(factors)] + [f"net{i}" for i in range(len(factors) - len(NETS))]
    for model, factor in zip(models, factors):
        rows += [bench_row("torch", model, "infer", 4, 0.01), bench_row("tf", model, "infer", 4, 0.01 * factor)]
    f = finding(pd.DataFrame(rows), "torch_faster")
    wins = [1 / x <= 1 - findings.TIE for x in factors]
    assert f.verdict == (HOLDS if all(wins) else FAILS if not any(wins) else MIXED)
    assert len(f.holds_for) == sum(wins)


# --- the report -----------------------------------------------------------------------------

def _images(md: str) -> list[str]:
    return sorted(re.findall(r"!\[[^]]*\]\(([^)]+)\)", md))


def test_report_has_the_analysis_charts_and_findings_when_rows_support_them(tmp_path):
    pytest.importorskip("matplotlib")
    rows = zoo_rows({"torch": 1.0, "tf": 2.0, "mxnet": 1.5}, memory={"mxnet": 0.5})
    html_path, md_path = report.write({"bench": rows}, tmp_path / "report")
    md = md_path.read_text()
    for name in ("efficiency.png", "step_vs_batch.png", "memory_vs_batch.png"):
        assert name in _images(md)
    page = html_path.read_text()
    assert "## Findings" in md and "MXNet uses less memory for the same model" in page
    line = next(line for line in md.splitlines() if line.startswith("| MXNet uses less memory"))
    assert "| holds |" in line and "geometric mean 0.50x" in line
    assert "| cannot be decided |" in next(line for line in md.splitlines() if "Keras' encapsulation" in line)
    assert "rss_increase_mb" in page  # the memory chart says which memory it shows


def test_report_leaves_out_charts_the_rows_cannot_support(tmp_path):
    pytest.importorskip("matplotlib")
    one_batch = zoo_rows(cells=(("train", 16),))
    _, md_path = report.write({"bench": one_batch}, tmp_path / "one")
    md = md_path.read_text()
    assert "efficiency.png" in _images(md)
    assert "step_vs_batch.png" not in md and "memory_vs_batch.png" not in md and "two batch sizes" in md
    one_model = zoo_rows()[lambda d: d["model"] == "lenet5"].drop(columns="rss_increase_mb")
    _, md_path = report.write({"bench": one_model}, tmp_path / "single")
    md = md_path.read_text()
    assert "efficiency.png" not in md and "memory_vs_batch.png" not in md and "step_vs_batch.png" in md
    assert "## Findings" in md and "no rows of a VGG network" in md


def test_report_command_prints_the_findings(tmp_path, capsys, monkeypatch):
    from samenet.results import Store

    monkeypatch.setattr(report, "_has_matplotlib", lambda: False)  # the charts are tested above; this is the CLI

    store = Store(tmp_path, "zoo")
    for _, r in zoo_rows({"torch": 1.0, "tf": 2.0}).iterrows():
        store.write(r.to_dict())
    assert main(["report", "--results", str(tmp_path), "--kind", "zoo", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "finding torch_faster: holds" in out and "finding mxnet_memory: cannot be decided: no rows of mxnet" in out
