"""The report: one self-contained HTML page and one Markdown file of tables, plots and environment.

``build(rows)`` turns result rows into a list of blocks (headings, paragraphs, tables, figures);
``write_html`` and ``write_markdown`` render the same blocks, so both files always say the same
thing. The HTML page embeds its plots as base64 PNG and its style inline: it can be mailed or
uploaded as one file. The Markdown file refers to PNG files written next to it.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot): no global state,
no display needed. Without matplotlib (the ``report`` extra) the report still has every table
and says that plots were left out. A kind of row that is missing (no training runs, no parity
rows, one batch size only) gives a sentence instead of its plot.

The analysis section (``analysis_blocks``) adds throughput against GMACs per sample, step time
and memory against batch size, and the findings of ``samenet.findings``: the literature's claims
checked against the rows.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import tables

TIMING_COLUMNS = ("step_median_s", "step_p10_s", "step_p90_s", "step_iqr_s", "step_mean_s", "step_std_s",
                  "step_min_s", "step_max_s")


@dataclass
class Table:
    """A table block: column names, rows of strings, and what it shows and how it was measured."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    right: set[str] = field(default_factory=set)


@dataclass
class Figure:
    """A plot block: a file name (Markdown), PNG bytes and a description (alt text)."""

    name: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


def _plt_figure(width: float, height: float):
    """A matplotlib Figure not attached to pyplot, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        return None
    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _colors(names) -> dict[str, object]:
    """One stable color per backend across every plot."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    return {n: palette[i % len(palette)] for i, n in enumerate(sorted(names))}


def _panel_keys(p: tables.Pivot) -> list[str]:
    """Index levels other than model: each combination gets its own panel."""
    return [n for n in p.value.index.names if n != "model"]


def bar_plot(p: tables.Pivot, name: str, log: bool = True) -> Figure | None:
    """Grouped bars per model, one bar per backend, error bars from the pivot's spread."""
    if p.empty or p.value.isna().all().all():
        return None
    panels = _panel_keys(p)
    groups = list(p.value.groupby(level=panels, sort=True)) if panels else [((), p.value)]
    groups = [(k, g) for k, g in groups if np.isfinite(g.to_numpy(dtype=float)).any()]  # panels of failures only
    colors = _colors(p.value.columns)
    n_models = max(len(g) for _, g in groups)
    fig = _plt_figure(max(6.0, 1.2 + 0.9 * n_models * max(1, len(p.value.columns)) / 2), 2.8 * len(groups) + 0.4)
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(p.value.columns))
    for ax, (key, g) in zip(axes, groups):
        models = [i[0] if isinstance(i, tuple) else i for i in g.index]
        x = np.arange(len(models))
        for j, col in enumerate(p.value.columns):
            v = g[col].to_numpy(dtype=float)
            lo = p.low.loc[g.index, col].to_numpy(dtype=float)
            hi = p.high.loc[g.index, col].to_numpy(dtype=float)
            err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)]).clip(min=0)
            ax.bar(x + (j - (len(p.value.columns) - 1) / 2) * width, v, width, yerr=err, capsize=2,
                   label=str(col), color=colors[col])
        ax.set_xticks(x, models, rotation=30 if len(models) > 6 else 0, ha="right" if len(models) > 6 else "center")
        ax.set_ylabel(p.metric.unit)
        if log and np.nanmin(g.to_numpy(dtype=float)) > 0:
            ax.set_yscale("log")
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panels, key)) or p.metric.label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncols=min(5, len(p.value.columns)))
    fig.suptitle(f"{p.metric.label} ({p.metric.unit})", fontsize=11)
    return Figure(name, _png(fig), f"{p.metric.label} per model and backend, error bars: spread",
                  "error bars: " + ("p10-p90 of the step times" if p.metric.timing else "min-max over repeats"))


def scaling_plot(rows, name: str) -> Figure | None:
    """Throughput against batch size, one line per backend, one panel per (model, mode)."""
    p = tables.pivot(rows, "throughput", None)
    if p.empty or "batch" not in p.value.index.names:
        return None
    batches = p.value.index.get_level_values("batch").unique()
    if len(batches) < 2:
        return None
    others = [n for n in p.value.index.names if n != "batch"]
    groups = [(k, g) for k, g in p.value.groupby(level=others, sort=True)
              if g.index.get_level_values("batch").nunique() > 1]
    if not groups:
        return None
    colors = _colors(p.value.columns)
    cols = min(3, len(groups))
    n_rows = -(-len(groups) // cols)
    fig = _plt_figure(4.2 * cols, 3.2 * n_rows + 0.4)
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, (key, g) in zip(axes, groups):
        b = g.index.get_level_values("batch").to_numpy(dtype=float)
        order = np.argsort(b)
        for col in g.columns:
            v = g[col].to_numpy(dtype=float)[order]
            if np.isfinite(v).any():
                lo = p.low.loc[g.index, col].to_numpy(dtype=float)[order]
                hi = p.high.loc[g.index, col].to_numpy(dtype=float)[order]
                ax.plot(b[order], v, marker="o", label=str(col), color=colors[col])
                ax.fill_between(b[order], lo, hi, alpha=0.2, color=colors[col])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples/s")
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(str(k) for k in key), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle("throughput against batch size (band: p10-p90)", fontsize=11)
    return Figure(name, _png(fig), "throughput against batch size per model, mode and backend")


def _ok_summary(rows):
    """Medians per backend variant and configuration of the ok rows (samenet.findings.summarise)."""
    from .findings import summarise

    return summarise(rows)


def _legend(ax, colors: dict, marker: str = "o", line: bool = True) -> None:
    """A legend of every backend variant in the figure, not only those of the panel it sits in."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=marker, linestyle="-" if line else "none", label=str(v))
               for v, c in colors.items()]
    ax.legend(handles=handles, fontsize=7)


def efficiency_plot(rows, name: str) -> Figure | None:
    """Throughput against GMACs per sample, bubble area by parameters, one panel per (mode, batch).

    Log axes: the zoo spans four orders of magnitude in MACs. Only panels with two or more
    networks are drawn; None when no panel has.
    """
    t = _ok_summary(rows)
    t = t[t["samples_per_s"].notna() & (t["macs_per_sample"] > 0)] if not t.empty else t
    if t.empty:
        return None
    groups = [(k, g) for k, g in t.groupby(["mode", "batch"], sort=True) if g["model"].nunique() > 1]
    groups.sort(key=lambda kg: (kg[0][0], int(kg[0][1])))
    if not groups:
        return None
    colors = _colors(t["variant"].unique())
    biggest = float(t["params"].max()) if t["params"].notna().any() else 1.0
    fig, axes = _panel_grid(len(groups), 3, 5.0, 4.2)
    for ax, ((mode, batch), g) in zip(axes, groups):
        for variant, gv in g.groupby("variant"):
            size = 15 + 600 * gv["params"].fillna(0).to_numpy(dtype=float) / biggest
            ax.scatter(gv["macs_per_sample"].to_numpy(dtype=float) / 1e9, gv["samples_per_s"].to_numpy(dtype=float),
                       s=size, alpha=0.55, color=colors[variant], edgecolors="black", linewidths=0.4, label=variant)
        # Each network named once, at its fastest backend's point.
        for model, gm in g.groupby("model"):
            best = gm.loc[gm["samples_per_s"].idxmax()]
            ax.annotate(model, (best["macs_per_sample"] / 1e9, best["samples_per_s"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GMACs per sample")
        ax.set_ylabel("samples/s")
        ax.set_title(f"{mode}, batch {batch}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    _legend(axes[0], colors, line=False)
    fig.suptitle("throughput against operations per sample (bubble area: parameters)", fontsize=11)
    return Figure(name, _png(fig), "throughput against GMACs per sample per backend, bubble area by parameters",
                  "median throughput of each (backend, network); log axes; each network named at its fastest point")


def _panel_grid(panels: int, most_cols: int, width: float, height: float):
    """A figure of ``panels`` panels, at most ``most_cols`` a row, each ``width`` x ``height`` inches."""
    cols = min(most_cols, panels)
    n_rows = -(-panels // cols)
    fig = _plt_figure(width * cols, height * n_rows + 0.6)
    return fig, fig.subplots(n_rows, cols, squeeze=False).ravel()


def per_batch_plot(rows, column: str, ylabel: str, title: str, name: str, log: bool = False) -> Figure | None:
    """``column`` against batch size: a panel per (model, mode) of two or more batch sizes, a line per backend.

    ``log``: a log y axis (step times of one network differ by orders of magnitude between backends).
    """
    t = _ok_summary(rows)
    t = t[t[column].notna()] if not t.empty else t
    if t.empty:
        return None
    t = t.assign(batch_n=t["batch"].astype(int))
    groups = [(k, g) for k, g in t.groupby(["model", "mode"], sort=True) if g["batch_n"].nunique() > 1]
    if not groups:
        return None
    colors = _colors(t["variant"].unique())
    fig, axes = _panel_grid(len(groups), 4, 3.6, 2.8)
    for ax, ((model, mode), g) in zip(axes, groups):
        for variant, gv in g.groupby("variant"):
            gv = gv.groupby("batch_n")[column].median().sort_index()
            ax.plot(gv.index.to_numpy(), gv.to_numpy(dtype=float), marker="o", color=colors[variant], label=variant)
        ax.set_xscale("log", base=2)
        batches = sorted(g["batch_n"].unique())
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        if log and (g[column] > 0).all():
            ax.set_yscale("log")
        ax.set_title(f"{model}, {mode}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    _legend(axes[0], colors)
    fig.suptitle(title, fontsize=11)
    return Figure(name, _png(fig), f"{title}, per model and backend")


def analysis_blocks(bench, plots: bool) -> list:
    """The zoo analysis: throughput against MACs, step time and memory against batch size, and the findings."""
    from .findings import MEMORY, evaluate

    blocks: list = [Heading("Analysis")]
    if plots:
        made = [efficiency_plot(bench, "efficiency.png"),
                per_batch_plot(bench, "step_median_s", "step time (s)", "step time against batch size (log)",
                               "step_vs_batch.png", log=True),
                per_batch_plot(bench, MEMORY, "MB", f"memory against batch size: peak RSS over the post-import "
                                                    f"baseline ({MEMORY})", "memory_vs_batch.png")]
        blocks += [f for f in made if f]
        if not any(made[1:]):
            blocks.append(Paragraph("No step-time or memory chart against batch size: no network was measured at "
                                    "two batch sizes on one backend (samenet run --preset zoo measures 1 and 16)."))
        if not made[0]:
            blocks.append(Paragraph("No throughput-against-MACs chart: fewer than two networks measured in one mode "
                                    "and batch size."))
    found = evaluate(bench)
    blocks += [Heading("Findings"), Paragraph(
        "Claims of the literature, checked against the ok rows alone: two rows are compared only on the same "
        "network, mode, batch, input, precision, device, threads and machine class; within 5 % is a tie. "
        "holds: every comparison agrees; does not hold: none does; mixed: some do."),
        Table("findings", ["claim", "source", "verdict", "numbers", "holds for", "does not hold for", "note"],
              [[f.claim.text, f.claim.source, f.verdict, f.numbers, "; ".join(f.holds_for), "; ".join(f.fails_for),
                f.note] for f in found])]
    return blocks


def data_parallel_blocks(bench, plots: bool) -> list:
    """The data-parallel scaling table and plot (samenet.scaling), or nothing without DP rows."""
    from .scaling import efficiencies

    e = efficiencies(tables.prepare(bench)) if not bench.empty else None
    if e is None or e.empty:
        return []

    def num(v, fmt):
        return "" if v is None or v != v else format(v, fmt)

    columns = ["model", "backend", "scaling", "workers", "threads", "batch/w", "global", "1-worker ms", "step ms",
               "efficiency %", "speedup", "all-reduce ms", "ring model ms", "comm share %", "busbw GB/s", "transport"]
    rows = [[str(r["model"]), str(r["backend"]), str(r["scaling"]), str(r["workers"]), str(r["threads"]),
             str(r["batch_per_worker"]), str(r["global_batch"]), num(r["one_worker_s"] and r["one_worker_s"] * 1e3, ".1f"),
             num(r["step_s"] * 1e3, ".1f"), num(r.get("efficiency", float("nan")) * 100, ".0f"),
             num(r.get("speedup"), ".2f"), num(r["allreduce_s"] and r["allreduce_s"] * 1e3, ".2f"),
             num(r["ring_model_s"] and r["ring_model_s"] * 1e3, ".2f"),
             num(r["comm_share"] and r["comm_share"] * 100, ".0f"), num(r["busbw"] and r["busbw"] / 1e9, ".2f"),
             str(r["transport"] or "")] for _, r in e.sort_values(["model", "backend", "workers"]).iterrows()]
    blocks: list = [Heading("Data-parallel scaling"), Table(
        "scaling efficiency against one worker", columns, rows,
        "Step: the slowest rank's, each step timed between barriers. Efficiency: weak t1/tN, strong t1/(N tN), "
        "against the one-process cell of the same build and threads. All-reduce: the gradient's bytes on the "
        "group's transport; ring model 2(N-1)/N S/B, B the bus bandwidth of a 32 MiB all-reduce.", set(columns[3:15]))]
    if plots and "efficiency" in e:
        groups = list(e.groupby("model", sort=True))
        fig = _plt_figure(4.2 * min(3, len(groups)), 3.4 * -(-len(groups) // 3) + 0.4)
        axes = fig.subplots(-(-len(groups) // 3), min(3, len(groups)), squeeze=False).ravel()
        colors = _colors(sorted(e["backend"].unique()))
        for ax, (model, g) in zip(axes, groups):
            for (backend, scaling), gb in g.groupby(["backend", "scaling"]):
                gb = gb.sort_values("workers")
                ax.plot([1, *gb["workers"]], [1.0, *gb["efficiency"].astype(float)], marker="o",
                        linestyle="-" if scaling == "weak" else "--", color=colors[backend],
                        label=f"{backend} ({scaling})")
            ax.set_xlabel("workers")
            ax.set_ylabel("scaling efficiency")
            ax.set_title(str(model), fontsize=10)
            ax.set_ylim(0, 1.2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
        fig.suptitle("data-parallel scaling efficiency (1 = ideal)", fontsize=11)
        blocks.append(Figure("data_parallel.png", _png(fig), "data-parallel scaling efficiency per model and backend"))
    return blocks


def training_plot(rows, name: str) -> Figure | None:
    """Test accuracy and training loss per epoch, one panel pair per model, one line per backend and seed."""
    ok = rows[rows["status"] == "ok"] if not rows.empty and "status" in rows else rows
    if ok.empty or "test_acc" not in ok:
        return None
    ok = tables.newest(tables.prepare(ok), "train")
    models = sorted(ok["model"].unique())
    colors = _colors(ok["backend"].unique())
    fig = _plt_figure(9.0, 3.0 * len(models) + 0.4)
    axes = fig.subplots(len(models), 2, squeeze=False)
    for (ax_acc, ax_loss), model in zip(axes, models):
        for _, r in ok[ok["model"] == model].iterrows():
            epochs = r.get("epoch") or list(range(1, len(r["test_acc"]) + 1))
            label = f"{r['backend']} seed {r.get('seed', 0)}"
            ax_acc.plot(epochs, np.asarray(r["test_acc"]) * 100, marker=".", label=label, color=colors[r["backend"]])
            ax_loss.plot(epochs, r["train_loss"], marker=".", label=label, color=colors[r["backend"]])
        ax_acc.set_title(f"{model}: test accuracy (%)", fontsize=10)
        ax_loss.set_title(f"{model}: training loss (epoch mean)", fontsize=10)
        for ax in (ax_acc, ax_loss):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=7)
    return Figure(name, _png(fig), "training curves: test accuracy and training loss per epoch")


def parity_plot(rows, name: str) -> Figure | None:
    """Heat map backend x model of log10(error / tolerance); cells not passing are labelled."""
    p = tables.pivot(rows, "parity", None)
    if p.empty:
        return None
    value, status = p.value.copy(), p.status
    models = [i[0] if isinstance(i, tuple) else i for i in value.index]
    data = np.log10(np.clip(value.to_numpy(dtype=float).T, 1e-6, None))
    fig = _plt_figure(max(5.0, 0.55 * len(models) + 2.5), 0.5 * len(value.columns) + 2.0)
    ax = fig.subplots()
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, cmap="RdYlGn_r", vmin=-4, vmax=1, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(value.columns)), [str(c) for c in value.columns])
    for i, col in enumerate(value.columns):
        for j, idx in enumerate(value.index):
            s = status.at[idx, col]
            if isinstance(s, str) and s != "pass":
                ax.text(j, i, s[:6], ha="center", va="center", fontsize=7)
            elif s != s or s is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
    fig.colorbar(im, ax=ax, label="log10(error / tol), <= 0 passes")
    ax.set_title("parity against the numpy oracle", fontsize=11)
    return Figure(name, _png(fig), "parity heat map: log10 of the largest error over its tolerance")


def pivot_table(p: tables.Pivot, title: str) -> Table:
    names, cols, rows = tables.text_rows(p)
    return Table(title, names + cols, rows, p.caption, set(cols))


def spread_table(rows) -> Table:
    """Every timing of every ok bench row: the full distribution summary, not only the median."""
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    ok = tables.newest(ok, "bench").sort_values(["model", "mode", "batch", "backend"], kind="stable")
    columns = ["backend", "model", "mode", "batch", "repeat", "iters", "median ms", "p10 ms", "p90 ms", "IQR ms",
               "mean ms", "std ms", "min ms", "max ms", "first step s", "build s", "import s"]
    out = []
    for _, r in ok.iterrows():
        ms = [tables.fmt_value(float(r[c]) * 1e3) if c in r and r[c] == r[c] else "" for c in TIMING_COLUMNS]
        secs = [tables.fmt_value(float(r[c])) if c in r and r[c] == r[c] else ""
                for c in ("first_step_s", "build_s", "import_s")]
        out.append([str(r["backend"]), str(r["model"]), str(r["mode"]), str(r["batch"]), str(r.get("repeat", 0)),
                    str(r.get("iters", "")), *ms, *secs])
    return Table("spread of every timing", columns, out,
                 "Per-process statistics of the timed steps (one row per cell and repeat). "
                 + tables.how_measured(ok), set(columns[4:]))


def environment_table(frames: dict) -> Table:
    """One line per distinct environment a row was measured in."""
    import pandas as pd

    parts = []
    for kind, df in frames.items():
        if not df.empty:
            parts.append(df.assign(row_kind=kind))
    if not parts:
        return Table("environment", ["no rows"], [])
    df = pd.concat(parts, ignore_index=True)
    cols = ["row_kind", "backend", "framework_version", "python", "cpu_model", "cpu_affinity", "memory_gb", "gpu",
            "threads", "cpu_settings", "thread_env", "machine_class", "git_revision", "git_dirty", "hostname"]
    for c in cols:
        if c not in df:
            df[c] = None
    df = df.assign(when=df["timestamp"].astype(str) if "timestamp" in df else "")
    text = df[cols].map(_env_text) if hasattr(df, "map") else df[cols].applymap(_env_text)
    text["when"] = df["when"]
    out = []
    for key, g in text.groupby(cols, sort=True, dropna=False):
        out.append([*key, str(len(g)), f"{min(g['when'])[:16]} .. {max(g['when'])[:16]}"])
    names = ["rows of", "backend", "framework", "python", "CPU", "cpus", "memory GB", "GPU", "threads", "CPU settings",
             "thread variables", "machine class", "git revision", "dirty", "host", "rows", "measured (UTC)"]
    return Table("environment of each run", names, out,
                 "Timings are comparable only within one machine class (CPU model x cores x GPU); the framework's "
                 "own CPU settings of each row are in its 'settings' column (samenet.results.load()).", {"rows"})


def _env_text(v) -> str:
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in sorted(v.items()))
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # a column with gaps is float in pandas: 2.0 cpus is 2
    return str(v)


def failures_table(frames: dict) -> Table | None:
    out = []
    for kind, df in frames.items():
        if df.empty or "status" not in df:
            continue
        bad = df[~df["status"].isin(["ok", "pass"])]
        for _, r in bad.iterrows():
            reason = r.get("error") if isinstance(r.get("error"), str) else r.get("reason")
            out.append([kind, str(r.get("backend")), str(r.get("model")), str(r.get("mode", "") or ""),
                        str(r["status"]), str(reason or "")[:160]])
    if not out:
        return None
    return Table("cells that did not finish or pass", ["rows of", "backend", "model", "mode", "status", "reason"],
                 out, "Every outcome is a row: error, unsupported, oom, timeout and crash rows are kept, not hidden.")


def build(frames: dict, baseline: str | None = "auto", models=None, backends=None, plots: bool = True,
          title: str = "samenet report") -> list:
    """The report's blocks from rows: {"bench": DataFrame, "train": DataFrame, "parity": DataFrame}."""
    import pandas as pd

    frames = {k: tables.select(v, models, backends) if not v.empty else v
              for k, v in {s: frames.get(s, pd.DataFrame()) for s in ("bench", "train", "parity")}.items()}
    bench, train, parity = frames["bench"], frames["train"], frames["parity"]
    plots = plots and _has_matplotlib()
    blocks: list = [Heading(title, 1),
                    Paragraph(f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from "
                              f"{len(bench)} bench, {len(train)} train and {len(parity)} parity rows. Every network "
                              "is built from one spec in every framework; parity proves the builds identical "
                              "before their speed is compared.")]
    if not plots:
        blocks.append(Paragraph("Plots left out: matplotlib is not installed (pip install 'samenet[report]')."))

    blocks.append(Heading("Speed and memory"))
    if bench.empty:
        blocks.append(Paragraph("No bench rows: measure with `samenet run` first."))
    else:
        for name in ("step", "throughput", "gflops", "first_step", "memory", "gpu_memory"):
            p = tables.pivot(bench, name, baseline)
            if p.empty or p.value.isna().all().all():
                continue
            blocks.append(pivot_table(p, f"{p.metric.label} ({p.metric.unit})"))
            if plots and name in ("throughput", "memory"):
                fig = bar_plot(p, f"{name}.png")
                if fig:
                    blocks.append(fig)
        if plots:
            fig = scaling_plot(bench, "scaling.png")
            blocks.append(fig or Paragraph("No batch-size scaling plot: every cell was measured at one batch size."))
        blocks.append(spread_table(bench))
        blocks += data_parallel_blocks(bench, plots)
        blocks += analysis_blocks(bench, plots)

    blocks.append(Heading("Accuracy"))
    p = tables.pivot(train, "accuracy", baseline)
    if p.empty:
        blocks.append(Paragraph("No train rows: no training curves or accuracy table (run `samenet train`)."))
    else:
        blocks.append(pivot_table(p, "final test accuracy (%)"))
        if plots:
            fig = training_plot(train, "training.png")
            blocks.append(fig or Paragraph("No finished training run to plot."))

    blocks.append(Heading("Parity"))
    p = tables.pivot(parity, "parity", None)
    if p.empty:
        blocks.append(Paragraph("No parity rows: no parity heat map (run `samenet parity`)."))
    else:
        blocks.append(pivot_table(p, "parity error / tolerance"))
        if plots:
            fig = parity_plot(parity, "parity.png")
            if fig:
                blocks.append(fig)

    failures = failures_table(frames)
    if failures:
        blocks += [Heading("Failures"), failures]
    blocks += [Heading("Environment"), environment_table(frames)]
    return blocks


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
p.caption { font-size: 0.85em; color: #555; max-width: 100em; }
figure { margin: 1em 0; } img { max-width: 100%; }
"""


def write_html(blocks: list, path: Path) -> Path:
    """One self-contained page: inline style, plots as data: URIs, no external asset."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{esc(next((b.text for b in blocks if isinstance(b, Heading)), 'report'))}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(f"<h3>{esc(b.title)}</h3><table><thead><tr>"
                       + "".join(f"<th>{esc(c)}</th>" for c in b.columns) + "</tr></thead><tbody>")
            for r in b.rows:
                out.append("<tr>" + "".join(f"<td class='num'>{esc(v)}</td>" if c in b.right else f"<td>{esc(v)}</td>"
                                            for c, v in zip(b.columns, r)) + "</tr>")
            out.append("</tbody></table>")
            if b.caption:
                out.append(f"<p class='caption'>{esc(b.caption)}</p>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f"<figure><img alt='{esc(b.alt)}' src='data:image/png;base64,{data}'>"
                       + (f"<figcaption>{esc(b.caption)}</figcaption>" if b.caption else "") + "</figure>")
    out.append("</body></html>")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _md_text(v) -> str:
    """Text as Markdown shows it: a renderer passes HTML through, so <, > and & are escaped
    (an error text holding "<module>" or a model named "<b>" stays text)."""
    return html.escape(str(v), quote=False)


def _md_cell(v) -> str:
    return _md_text(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns, rows, right=()) -> list[str]:
    """A pipe table's lines, cells escaped as the rest of the Markdown (``right``: right-aligned columns)."""
    return ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
            "|" + "|".join(" ---: " if c in right else " --- " for c in columns) + "|",
            *("| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows)]


def write_markdown(blocks: list, path: Path) -> Path:
    """Markdown with pipe tables; each plot is written as a PNG file next to it."""
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md_text(b.text)}\n")
        elif isinstance(b, Paragraph):
            out.append(f"{_md_text(b.text)}\n")
        elif isinstance(b, Table):
            out.append(f"**{_md_text(b.title)}**\n")
            out += markdown_table(b.columns, b.rows, b.right)
            out.append("")
            if b.caption:
                out.append(f"_{_md_text(b.caption)}_\n")
        elif isinstance(b, Figure):
            (path.parent / b.name).write_bytes(b.png)
            out.append(f"![{_md_text(b.alt)}]({b.name})\n" + (f"\n_{_md_text(b.caption)}_\n" if b.caption else ""))
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def write(frames: dict, out_dir: Path, **kw) -> tuple[Path, Path]:
    """Builds the report and writes ``report.html`` and ``report.md`` (+ PNGs) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = build(frames, **kw)
    return write_html(blocks, out_dir / "report.html"), write_markdown(blocks, out_dir / "report.md")
