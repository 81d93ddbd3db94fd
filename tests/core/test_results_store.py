"""The results store under damage: readers skip a file that is not a row with one warning
naming it; writers keep every row inside the store whatever the row's names hold."""

from __future__ import annotations

import json
import os
import time

from samenet.results import STALE_TMP_S, Store, load

GOOD = {"backend": "torch", "model": "lenet5", "mode": "infer", "batch": 1, "status": "ok", "cell_key": "k1",
        "timestamp": "2026-12-03T10:00:00+00:00"}
DAMAGED = {
    "null.json": "null",
    "number.json": "3",
    "list.json": "[1, 2]",
    "no-model.json": json.dumps({"backend": "torch", "status": "ok"}),
    "bad-time.json": json.dumps({**GOOD, "timestamp": "yesterday"}),
    "string-batch.json": json.dumps({**GOOD, "batch": "16"}),
    "empty.json": "",
    "truncated.json": json.dumps(GOOD)[:30],
}


def test_damaged_row_files_are_skipped_each_with_one_warning(tmp_path, capsys):
    store = Store(tmp_path, "bench")
    store.write(GOOD)
    for name, text in DAMAGED.items():
        (store.dir / name).write_text(text)
    stale = store.dir / ".left-behind.json.abc123.tmp"
    stale.write_text("{")
    os.utime(stale, (time.time() - STALE_TMP_S - 1,) * 2)
    fresh = store.dir / ".being-written.json.def456.tmp"  # a live writer's: not a warning
    fresh.write_text("{")
    df = load(tmp_path, "bench")
    assert len(df) == 1 and df.iloc[0]["cell_key"] == "k1"
    assert store.statuses() == {"k1": "ok"}
    lines = capsys.readouterr().err.strip().splitlines()
    named = {name for name in [*DAMAGED, stale.name] for line in lines if f"{name}: skipped" in line}
    assert named == {*DAMAGED, stale.name}, lines
    assert len(lines) == len(DAMAGED) + 1, "one line per damaged file, none for a live writer's"
    load(tmp_path, "bench")
    assert not capsys.readouterr().err, "a file is named once per process"


def test_a_model_given_as_a_path_keeps_its_row_in_the_store(tmp_path):
    store = Store(tmp_path, "bench")
    path = store.write({**GOOD, "model": "specs/../../lenet5.json"})
    assert path.parent == store.dir and path.exists()
    assert [r["model"] for r in store.rows()] == ["specs/../../lenet5.json"]


def test_markup_in_an_error_is_shown_as_it_is():
    import pandas as pd
    from rich.console import Console

    from samenet.commands_run import results_table

    df = pd.DataFrame([{**GOOD, "status": "error", "error": "RuntimeError: bad [/x] and [bold]", "input": None,
                        "step_median_s": None, "exec_mode": None}])
    out = Console(record=True, width=200)
    out.print(results_table(df, "title with [/y]"))
    text = out.export_text()
    assert "[/x]" in text and "[bold]" in text and "[/y]" in text


def test_results_and_baselines_default_to_the_current_folder(tmp_path, monkeypatch):
    from samenet.check import baseline_path
    from samenet.results import default_root

    monkeypatch.delenv("SAMENET_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / "results"
    assert baseline_path("quick") == tmp_path / "results" / "baselines" / "quick.json"
    monkeypatch.setenv("SAMENET_RESULTS", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"


def test_the_cpu_isa_names_only_known_extensions_this_cpu_has(monkeypatch, tmp_path):
    from samenet import env

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile\n")
    real = env.Path
    monkeypatch.setattr(env, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    assert env.cpu_isa() == "avx2,fma,avx512f,avx512_bf16,amx_tile"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert env.cpu_isa() == ""
