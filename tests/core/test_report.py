"""Tables and the report: pivots with ratios and spreads, a self-contained HTML page, Markdown with PNGs."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from samenet import report, tables
from samenet.cli import main
from samenet.results import Store, load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"machine_class": "Test CPU / 2 cpus", "cpu_model": "Test CPU", "cpu_affinity": 2, "python": "3.11.7",
       "git_revision": "0123456789ab", "git_dirty": False, "hostname": "testhost", "memory_gb": 8.0,
       "thread_env": {"OMP_NUM_THREADS": "2"}}


def bench_row(backend, model, mode, batch, step_s, repeat=0, **kw):
    samples = [int(step_s * 1e9 * f) for f in (0.9, 0.95, 1.0, 1.0, 1.05, 1.2)]
    return {"backend": backend, "model": model, "mode": mode, "batch": batch, "input": "1x32x32", "device": "cpu",
            "precision": "fp32", "exec_mode": "eager" if backend == "torch" else "graph", "options": {},
            "threads": 2, "cpu_settings": "tuned", "warmup": 3, "iters": 6, "repeat": repeat, "seed": 0,
            "cell_key": f"{backend}-{model}-{mode}-{batch}", "status": "ok", "framework_version": f"{backend}-9.9",
            "step_median_s": step_s, "step_p10_s": step_s * 0.92, "step_p90_s": step_s * 1.12,
            "step_iqr_s": step_s * 0.08, "step_mean_s": step_s, "step_std_s": step_s * 0.1, "step_min_s": step_s * 0.9,
            "step_max_s": step_s * 1.2, "samples_ns": samples, "samples_per_s": batch / step_s,
            "gflops_per_s": 2.0 * batch / step_s * 0.0004, "peak_rss_mb": 300.0 + batch, "first_step_s": 0.5,
            "build_s": 0.1, "import_s": 1.0, "params_trainable": 61706, "macs_per_sample": 416520, **ENV, **kw}


def write_bench(root, batches=(2, 8)):
    store = Store(root, "bench")
    for backend, factor in (("torch", 1.0), ("tf", 2.0)):
        for model in ("lenet5", "alexnet"):
            for mode in ("train", "infer"):
                for b in batches:
                    store.write(bench_row(backend, model, mode, b, 0.001 * factor * b))
    store.write(bench_row("torch", "resnet18", "train", 2, 1.0, input="3x224x224"))
    # a cell that died before building records the configuration as asked: defaults left as None
    store.write({**bench_row("tf", "resnet18", "train", 2, 1.0), "status": "oom", "error": "out of memory",
                 "exec_mode": None, "input": None, "options": []})


def write_train(root):
    store = Store(root, "train")
    for backend, acc in (("torch", [0.5, 0.8]), ("tf", [0.5, 0.78])):
        store.write({"backend": backend, "model": "lenet5", "data": "digits", "epochs": 2, "batch": 32,
                     "lr": [0.05, 0.05], "schedule": "constant", "momentum": 0.9, "weight_decay": 5e-4, "seed": 0,
                     "device": "cpu", "threads": 2, "status": "ok", "epoch": [1, 2], "train_loss": [1.5, 0.7],
                     "test_loss": [1.2, 0.8], "test_acc": acc, "train_time_s": [3.0, 6.0], "final_test_acc": acc[-1],
                     "best_test_acc": max(acc), "framework_version": f"{backend}-9.9"})


def write_parity(root):
    store = Store(root, "parity")
    for backend, model, status, ratio in (("torch", "lenet5", "pass", 0.01), ("tf", "lenet5", "pass", 0.02),
                                          ("torch", "alexnet", "pass", 0.05), ("tf", "alexnet", "fail", 4.0)):
        store.write({"backend": backend, "model": model, "status": status, "fwd_worst_ratio": ratio,
                     "train_worst_ratio": ratio / 3, "framework_version": f"{backend}-9.9"})


def frames(root, kind="bench"):
    return {"bench": load(root, kind), "train": load(root, "train"), "parity": load(root, "parity")}


def test_pivot_is_backend_by_model_with_ratios_and_spread(tmp_path):
    write_bench(tmp_path)
    p = tables.pivot(load(tmp_path), "step", baseline="torch")
    assert list(p.value.columns) == ["tf", "torch"]
    assert p.value.index.names == ["model", "mode", "batch"]
    assert p.value.loc[("lenet5", "train", 8), "torch"] == pytest.approx(8.0)  # ms
    assert p.ratio.loc[("lenet5", "train", 8), "tf"] == pytest.approx(2.0)
    # the spread pools the timed steps: p10/p90 of the samples, around the median
    assert p.low.loc[("lenet5", "train", 8), "torch"] < 8.0 < p.high.loc[("lenet5", "train", 8), "torch"]
    assert p.status.loc[("resnet18", "train", 2), "tf"] == "oom"
    assert p.value.loc[("resnet18", "train", 2), "torch"] == pytest.approx(1000.0)  # one line, not two
    text = p.text()
    assert text.loc[("lenet5", "train", 8), "tf"].endswith("2.00x") and "[" in text.loc[("lenet5", "train", 8), "tf"]
    assert text.loc[("resnet18", "train", 2), "tf"] == "oom"
    throughput = tables.pivot(load(tmp_path), "throughput", baseline="torch")
    assert throughput.ratio.loc[("lenet5", "infer", 2), "tf"] == pytest.approx(0.5)
    assert "untimed warm-up" in p.caption and "threads 2" in p.caption and "exec mode" in p.caption


def test_pivot_of_accuracy_and_parity(tmp_path):
    write_train(tmp_path)
    write_parity(tmp_path)
    acc = tables.pivot(load(tmp_path, "train"), "accuracy", baseline="torch")
    assert acc.value.loc[("lenet5", "digits", 2), "tf"] == pytest.approx(78.0)
    assert acc.ratio.loc[("lenet5", "digits", 2), "tf"] == pytest.approx(-2.0)  # percentage points
    par = tables.pivot(load(tmp_path, "parity"), "parity")
    assert par.value.loc["alexnet", "tf"] == pytest.approx(4.0) and par.status.loc["alexnet", "tf"] == "fail"
    assert "fail" in par.text().loc["alexnet", "tf"]


def test_repeats_are_aggregated_by_their_median(tmp_path):
    store = Store(tmp_path, "bench")
    for i, s in enumerate((0.010, 0.011, 0.050)):
        store.write(bench_row("torch", "lenet5", "infer", 4, s, repeat=i))
    p = tables.pivot(load(tmp_path), "step")
    assert p.value.iloc[0, 0] == pytest.approx(11.0) and p.count.iloc[0, 0] == 3


def test_varying_configuration_becomes_an_index_level(tmp_path):
    store = Store(tmp_path, "bench")
    store.write(bench_row("torch", "lenet5", "infer", 4, 0.01))
    store.write(bench_row("torch", "lenet5", "infer", 4, 0.02, threads=1, cell_key="other"))
    p = tables.pivot(load(tmp_path), "step")
    assert "threads" in p.value.index.names and len(p.value) == 2


def test_table_command_prints_every_metric_with_how_it_was_measured(tmp_path, capsys):
    write_bench(tmp_path)
    write_train(tmp_path)
    assert main(["table", "--results", str(tmp_path), "--baseline", "tf"]) == 0
    out = capsys.readouterr().out
    for title in ("step time (ms)", "throughput (samples/s)", "achieved GFLOP/s", "peak memory", "final test accuracy"):
        assert title in out
    assert "[p10-p90]" in out and "ratio to tf" in out and "3 untimed warm-up steps" in out
    assert "parity" in out and "no parity rows" in out  # a missing kind is a sentence, not a crash
    assert main(["table", "--results", str(tmp_path), "--metric", "nonsense"]) == 2
    assert main(["table", "--results", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("error:") == 2


def _img_sources(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src='([^']*)'", page)


def test_report_has_tables_plots_spreads_and_environments(tmp_path):
    pytest.importorskip("matplotlib")
    write_bench(tmp_path)
    write_train(tmp_path)
    write_parity(tmp_path)
    html_path, md_path = report.write(frames(tmp_path), tmp_path / "report", baseline="torch")
    page = html_path.read_text()
    sources = _img_sources(page)
    # throughput, memory, batch-size scaling, throughput against MACs, step time against batch size (no memory
    # against batch size: these rows have no rss_increase_mb), training curves, parity heat map
    assert len(sources) == 7
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # self-contained
    for text in ("step time (ms)", "throughput (samples/s)", "peak memory", "final test accuracy", "parity",
                 "spread of every timing", "p10 ms", "untimed warm-up", "environment of each run", "tf-9.9",
                 "torch-9.9", "Test CPU / 2 cpus", "0123456789ab", "OMP_NUM_THREADS=2", "out of memory", "2.00x"):
        assert text in page, text
    md = md_path.read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(images) == ["efficiency.png", "memory.png", "parity.png", "scaling.png", "step_vs_batch.png",
                              "throughput.png", "training.png"]
    for name in images:
        assert (md_path.parent / name).read_bytes()[:8] == PNG_MAGIC
    assert "| model | mode | batch | tf | torch |" in md and "untimed warm-up" in md


def test_report_degrades_when_kinds_of_rows_are_missing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    write_bench(tmp_path, batches=(4,))
    html_path, md_path = report.write(frames(tmp_path), tmp_path / "out")
    page = html_path.read_text()
    assert "No train rows" in page and "No parity rows" in page and "one batch size" in page
    assert len(_img_sources(page)) == 3  # throughput, memory and throughput against MACs (two networks)
    monkeypatch.setattr(report, "_has_matplotlib", lambda: False)
    html_path, _ = report.write(frames(tmp_path), tmp_path / "plain")
    assert "Plots left out" in html_path.read_text() and not _img_sources(html_path.read_text())


def test_report_command_on_a_real_numpy_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = str(tmp_path / "results")
    assert main(["run", "--backends", "numpy", "--models", "lenet5", "--modes", "infer", "--batch-sizes", "2",
                 "--warmup", "0", "--iters", "3", "--results", results, "--quiet"]) == 0
    assert main(["report", "--results", results]) == 0
    page = (tmp_path / "results" / "report" / "report.html").read_text()
    row = load(results).iloc[0]
    assert row["status"] == "ok"
    for text in ("numpy", row["framework_version"], row["cpu_model"], row["machine_class"], "No train rows"):
        assert str(text) in page
    assert len(_img_sources(page)) == 2
    assert main(["report", "--results", str(tmp_path / "nothing")]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_report_table_and_check_select_the_quick_rows_alike(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = str(tmp_path / "results")
    assert main(["run", "--backends", "numpy", "--models", "lenet5", "--modes", "infer", "--batch-sizes", "16",
                 "--warmup", "0", "--iters", "2", "--results", results, "--store", "quick", "--quiet"]) == 0
    assert main(["report", "--results", results]) == 2  # the bench store: empty
    assert main(["report", "--quick", "--results", results, "--out", str(tmp_path / "r")]) == 0
    assert "numpy" in (tmp_path / "r" / "report.html").read_text()
    assert main(["table", "--quick", "--results", results]) == 0
    assert main(["check", "--quick", "--results", results, "--update-baseline",
                 "--baseline", str(tmp_path / "quick.json")]) == 0
    capsys.readouterr()
    for command in ("report", "table", "check"):
        assert main([command, "--quick", "--kind", "zoo", "--results", results]) == 2
        assert "--quick reads the quick store" in capsys.readouterr().err


def _chromium() -> str | None:
    """Debian's chromium (.ci/run installs it where it can), or the Chrome of GitHub's runners."""
    names = ("chromium", "chromium-headless-shell", "google-chrome")
    return next((path for path in map(shutil.which, names) if path), None)


def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    write_bench(tmp_path)
    write_parity(tmp_path)
    html_path, _ = report.write(frames(tmp_path), tmp_path / "report")
    browser = _chromium()
    if not browser:
        pytest.skip("no chromium, chromium-headless-shell or google-chrome on PATH: rendering to PNG not checked")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    pixels = imread(str(shot))[..., :3]
    assert pixels.std() > 0.05  # not a blank page: text, tables and plots on white
    assert (pixels < 0.5).mean() > 0.001


def test_markdown_escapes_html_as_the_page_does(tmp_path):
    blocks = [report.Heading("<i>models</i>"), report.Paragraph("error: <module> & <script>alert(1)</script>"),
              report.Table("<b>t</b>", ["model"], [["<img src=x>|y"]], caption="a < b")]
    md = report.write_markdown(blocks, tmp_path / "report.md").read_text()
    page = report.write_html(blocks, tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "<script>" not in text and "<img" not in text and "<i>" not in text and "<b>" not in text, text
    assert "&lt;module&gt; &amp; &lt;script&gt;" in md and "&lt;img src=x&gt;\\|y" in md
