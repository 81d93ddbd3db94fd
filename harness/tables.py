"""Comparison tables: pandas pivots of result rows, backend x model, with ratios to a baseline.

The Python API for people who analyse further::

    from samenet.results import load
    from samenet.tables import pivot

    rows = load("results", kind="bench")           # one row per cell and repeat (columns: results.py)
    p = pivot(rows, "step", baseline="torch")       # a Pivot
    p.value      # DataFrame: index (model, mode, batch, ...) x columns (backend), in p.metric.unit
    p.low, p.high  # the spread of every value (p10/p90 of the timed steps for timings)
    p.ratio      # value / value of the baseline backend in the same row (None without a baseline)
    p.caption    # how the figures were measured, in words
    p.text()     # the cells as strings: "2.37 [2.30-2.50] 1.08x"

Metrics (``METRICS``): ``step``, ``throughput``, ``gflops``, ``first_step``, ``memory``,
``gpu_memory`` (bench rows, or rows of any store written by ``samenet run``), ``accuracy``
(train rows) and ``parity`` (parity rows). Only rows with status ``ok`` (bench, train) give
values; a cell with rows but none ok shows the status (``oom``, ``unsupported``, ...) in ``text()``
and in ``Pivot.status``.

The index has ``model`` and, for bench rows, ``mode`` and ``batch``; every other configuration
column that varies in the rows given (input, device, precision, threads, CPU settings, machine
class) becomes a further index level, so that values measured differently never share a cell.
A backend run in several execution modes or options gets one column per variant
(``torch (compile)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# Configuration columns that become index levels when they vary within the rows.
VARYING = ("input", "device", "precision", "threads", "cpu_settings", "workers", "scaling", "machine_class")
# Columns that identify one training run (several seeds of one configuration are aggregated).
TRAIN_KEYS = ("backend", "model", "data", "epochs", "batch", "lr_text", "schedule", "momentum", "weight_decay",
              "device", "exec_mode", "seed")
OK = "ok"


@dataclass(frozen=True)
class Metric:
    """One comparable quantity: the row column it comes from and how it is shown.

    Attributes:
        name: Its name on the command line (``--metric``).
        column: The row column (after ``prepare``) holding the raw value.
        label: What it is, in words.
        unit: The unit of the values in a Pivot (after ``scale``).
        scale: Factor from the row's unit to ``unit`` (seconds -> ms: 1000).
        source: The kind of rows it needs: bench (any store written by ``run``), train or parity.
        higher_is_better: True for throughput and accuracy.
        timing: True when the spread comes from the per-step times (p10/p90).
    """

    name: str
    column: str
    label: str
    unit: str
    scale: float
    source: str
    higher_is_better: bool
    timing: bool


METRICS = {m.name: m for m in (
    Metric("step", "step_median_s", "step time", "ms", 1e3, "bench", False, True),
    Metric("throughput", "samples_per_s", "throughput", "samples/s", 1.0, "bench", True, True),
    Metric("gflops", "gflops_per_s", "achieved GFLOP/s", "GFLOP/s", 1.0, "bench", True, True),
    Metric("first_step", "first_step_s", "first step (tracing, compilation, allocation)", "s", 1.0, "bench",
           False, False),
    Metric("memory", "peak_rss_mb", "peak memory (RSS of the cell process)", "MB", 1.0, "bench", False, False),
    Metric("gpu_memory", "gpu_nvml_mb", "GPU memory (NVML, per process)", "MB", 1.0, "bench", False, False),
    Metric("accuracy", "final_test_acc", "final test accuracy", "%", 100.0, "train", True, False),
    Metric("parity", "parity_ratio", "parity error / tolerance (vs the numpy oracle)", "x", 1.0,
           "parity", False, False),
)}
BENCH_METRICS = ("step", "throughput", "gflops", "memory")
DEFAULT_METRICS = (*BENCH_METRICS, "accuracy", "parity")


@dataclass
class Pivot:
    """A backend x model table of one metric (see the module docstring)."""

    metric: Metric
    value: "pd.DataFrame"  # noqa: F821  (pandas is imported lazily)
    low: "pd.DataFrame"  # noqa: F821
    high: "pd.DataFrame"  # noqa: F821
    count: "pd.DataFrame"  # noqa: F821  rows behind each value (repeats, seeds)
    status: "pd.DataFrame"  # noqa: F821  'ok', or the outcome of a cell without a usable row
    ratio: "pd.DataFrame | None"  # noqa: F821
    baseline: str | None
    caption: str
    rows: "pd.DataFrame" = field(repr=False, default=None)  # noqa: F821  the rows used

    @property
    def empty(self) -> bool:
        return self.status.empty

    def text(self):
        """The table as strings: value, ``[low-high]`` spread and the ratio to the baseline."""
        out = self.status.copy().astype(object)
        for idx in out.index:
            for col in out.columns:
                v = self.value.at[idx, col]
                if v != v:  # NaN: no usable row
                    s = self.status.at[idx, col]
                    out.at[idx, col] = "" if s != s or s is None else str(s)
                    continue
                lo, hi = self.low.at[idx, col], self.high.at[idx, col]
                parts = [fmt_value(v)]
                if lo == lo and hi == hi and (fmt_value(lo) != parts[0] or fmt_value(hi) != parts[0]):
                    parts.append(f"[{fmt_value(lo)}-{fmt_value(hi)}]")
                r = self.ratio.at[idx, col] if self.ratio is not None and col != self.baseline else np.nan
                if r == r:
                    parts.append(_ratio_text(self.metric, r))
                if self.metric.name == "parity" and self.status.at[idx, col] not in (OK, "pass"):
                    parts.append(str(self.status.at[idx, col]))
                out.at[idx, col] = " ".join(parts)
        return out


def fmt_value(v: float) -> str:
    """About three significant digits without exponents: 1594, 36.4, 2.37, 0.772, 0.0024."""
    if v != v:
        return ""
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _ratio_text(metric: Metric, r: float) -> str:
    if metric.name == "accuracy":
        return f"{r:+.2f}pp"
    return f"{r:.2f}x"


def _input_text(model, shape) -> str | None:
    from . import zoo

    return zoo.input_text(str(model), shape)


@lru_cache(maxsize=None)
def _backend_defaults(backend: str) -> tuple[str | None, dict]:
    from . import backend as registry

    try:
        cls = registry.get(backend)
    except Exception:  # noqa: BLE001  (a backend no longer registered)
        return None, {}
    return cls.exec_modes[0], {k: v[0] for k, v in cls.options.items()}


def fill_defaults(df):
    """Rows as resolved by the cell: exec mode, options and input filled in where a row left them to the default.

    A cell that crashed or timed out before building records the configuration as asked
    (exec mode None = the backend's first, input None = the spec's), an ok row what it resolved
    to; without this they would look like two configurations.
    """
    df = df.copy()
    if "input" in df and "model" in df:
        df["input"] = [_input_text(m, v) for v, m in zip(df["input"], df["model"])]
    if "backend" in df and ("exec_mode" in df or "options" in df):
        modes, opts = [], []
        for i, b in enumerate(df["backend"]):
            mode0, opts0 = _backend_defaults(str(b))
            mode = df["exec_mode"].iat[i] if "exec_mode" in df else None
            modes.append(mode if isinstance(mode, str) and mode else mode0)
            o = df["options"].iat[i] if "options" in df else None
            o = dict(o) if isinstance(o, (list, tuple)) else o if isinstance(o, dict) else {}
            opts.append({**opts0, **o})
        df["exec_mode"] = modes
        df["options"] = opts
    return df


def prepare(df):
    """Adds the derived columns the metrics use (``parity_ratio``, ``variant``, ``lr_text``) after ``fill_defaults``."""
    import pandas as pd

    df = fill_defaults(df) if {"backend", "mode"} <= set(df.columns) else df.copy()
    if "fwd_worst_ratio" in df or "train_worst_ratio" in df:
        cols = [c for c in ("fwd_worst_ratio", "train_worst_ratio") if c in df]
        df["parity_ratio"] = df[cols].apply(pd.to_numeric, errors="coerce").max(axis=1, skipna=True)
    if "lr" in df:
        # train rows record the learning rate of every epoch: the first one names the run
        df["lr_text"] = df["lr"].map(lambda v: str(v[0] if isinstance(v, (list, tuple)) and v else v))
    if "backend" in df:
        exec_mode = (df["exec_mode"].where(df["exec_mode"].notna(), "").astype(str) if "exec_mode" in df
                     else pd.Series("", index=df.index))
        options = df["options"].map(_options_text) if "options" in df else pd.Series("", index=df.index)
        flavour = (exec_mode + options.map(lambda o: f", {o}" if o else "")).str.strip(", ")
        variant = df["backend"].astype(str)
        for b in variant.unique():
            mine = variant == b
            if flavour[mine].nunique() > 1:  # only then does the column need the exec mode in its name
                variant = variant.where(~mine, variant + " (" + flavour + ")")
        df["variant"] = variant
    return df


def _options_text(o) -> str:
    if isinstance(o, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(o.items()))
    return "" if o is None or o != o else str(o)


def select(df, models=None, backends=None):
    """Rows of the given models and backends (None: all)."""
    if df.empty:
        return df
    if models:
        df = df[df["model"].isin(models)]
    if backends:
        df = df[df["backend"].isin(backends)]
    return df


def newest(df, source: str):
    """The newest rows per configuration: repeats kept for bench rows, seeds for train rows."""
    from .results import latest

    if df.empty:
        return df
    if source == "bench":
        df = latest(df)
        # Rows of one configuration from several machine classes: the newest class wins, so a
        # cell's repeats never mix machines.
        if "machine_class" in df and "cell_key" in df:
            last = df.groupby("cell_key")["machine_class"].transform("last")
            df = df[(df["machine_class"] == last) | df["machine_class"].isna()]
        return df
    keys = [k for k in (TRAIN_KEYS if source == "train" else ("backend", "model", "workers")) if k in df]
    text = df[keys].astype(str)
    return df.loc[~text.duplicated(keep="last")]


def index_columns(df, source: str) -> list[str]:
    """The pivot's index levels: the fixed ones of the source plus every configuration column that varies."""
    fixed = {"bench": ["model", "mode", "batch"], "train": ["model", "data", "epochs"], "parity": ["model"]}[source]
    fixed = [c for c in fixed if c in df]
    # Varying within one model: a spec's default input differs between models and is no reason
    # for a level, the same model measured at two inputs is.
    extra = [c for c in VARYING if c in df and c not in fixed
             and (df[c].astype(str).groupby(df["model"]).nunique() > 1).any()]
    if source == "train":
        extra = [c for c in extra if c in ("device", "threads")]
    if source == "parity":
        extra = []
    return fixed + extra


def choose_baseline(backends, requested: str | None = "auto") -> str | None:
    """``torch`` when present (the most common reference), else the first backend; None for 'none'."""
    backends = sorted(backends)
    if requested in (None, "none", ""):
        return None
    if requested != "auto":
        # a backend measured in several exec modes has one column per variant: take the first
        return next((b for b in backends if b == requested or b.startswith(f"{requested} (")), requested)
    if "torch" in backends:
        return "torch"
    return backends[0] if backends else None


def _step_spread(g) -> tuple[float, float, float]:
    """(median of the repeats' medians, p10, p90) of a cell's step times in seconds.

    The spread pools every timed step of every repeat, so it covers between-run spread too.
    """
    med = float(np.nanmedian(g["step_median_s"].astype(float)))
    samples = [s for s in g.get("samples_ns", []) if isinstance(s, (list, tuple)) and s]
    if samples:
        pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples]) / 1e9
        p10, p90 = np.percentile(pooled, [10, 90])
    else:
        p10, p90 = float(np.nanmedian(g["step_p10_s"])), float(np.nanmedian(g["step_p90_s"]))
    return med, float(p10), float(p90)


def _aggregate(metric: Metric, g) -> tuple[float, float, float]:
    """(value, low, high) of one cell from its ok rows, in the row's unit."""
    col = metric.column
    if col not in g or g[col].isna().all():
        return np.nan, np.nan, np.nan
    vals = g[col].astype(float).dropna()
    if metric.timing and "step_median_s" in g:
        med, p10, p90 = _step_spread(g)
        if metric.name == "step":
            return med, p10, p90
        # throughput and GFLOP/s are inversely proportional to the step time
        value = float(np.median(vals))
        return value, value * med / p90, value * med / p10
    if metric.source == "train":
        return float(vals.mean()), float(vals.min()), float(vals.max())
    if metric.source == "parity":
        return float(vals.max()), np.nan, np.nan
    return float(vals.median()), float(vals.min()), float(vals.max())


def pivot(df, metric: str = "step", baseline: str | None = "auto", models=None, backends=None):
    """A backend x model table of one metric from result rows.

    Args:
        df: Rows as returned by ``samenet.results.load`` (bench rows for timing and memory
            metrics, ``kind='train'`` rows for accuracy, ``kind='parity'`` rows for parity).
        metric: A name of ``METRICS``.
        baseline: Backend the ratios refer to; "auto" picks torch when present, None or "none"
            gives no ratios. Ratios are value / baseline value (accuracy: difference in points).
        models: Only these models (None: all).
        backends: Only these backends (None: all).

    Returns:
        A Pivot; empty (``p.empty``) when no row matches.
    """
    import pandas as pd

    from .errors import UsageError

    if metric not in METRICS:
        raise UsageError(f"--metric: unknown '{metric}' (known: {', '.join(METRICS)})")
    m = METRICS[metric]
    rows = select(df, models, backends)
    if not rows.empty:
        rows = newest(prepare(rows), m.source)
    if rows.empty:
        nothing = pd.DataFrame()
        return Pivot(m, nothing, nothing, nothing, nothing, nothing, None, None, "no rows", rows)
    index = index_columns(rows, m.source)
    keys = index + ["variant"]
    records = []
    for key, g in rows.groupby(keys, dropna=False, sort=True):
        good = g[g["status"].isin([OK, "pass"])] if m.source != "parity" else g
        value, low, high = _aggregate(m, good) if len(good) else (np.nan, np.nan, np.nan)
        if m.source == "parity":
            status = g["status"].iloc[-1]
        elif len(good):
            status = OK
        else:
            status = g["status"].iloc[-1]
        records.append((*key, value * m.scale, low * m.scale, high * m.scale, len(good), status))
    table = pd.DataFrame(records, columns=[*keys, "value", "low", "high", "count", "status"])

    def wide(col):
        return table.pivot(index=index, columns="variant", values=col)

    value, status = wide("value"), wide("status")
    base = choose_baseline(rows["variant"].unique(), baseline)
    ratio = None
    if base is not None and base in value.columns and m.source != "parity":
        ratio = value.sub(value[base], axis=0) if m.name == "accuracy" else value.div(value[base], axis=0)
    return Pivot(m, value, wide("low"), wide("high"), wide("count"), status, ratio,
                 base if ratio is not None else None, caption(rows, m, base if ratio is not None else None), rows)


def _values(df, col) -> str:
    if col not in df:
        return "?"
    vals = sorted({str(v) for v in df[col].dropna()})
    return "/".join(vals) if vals else "?"


def how_measured(df) -> str:
    """How the timings of bench rows were measured, in one paragraph (reproducible settings)."""
    repeats = df.groupby("cell_key").size() if "cell_key" in df else None
    procs = "/".join(str(n) for n in sorted(set(repeats))) if repeats is not None and len(repeats) else "1"
    modes = []
    if "exec_mode" in df:
        for b, g in df.groupby("backend"):
            modes.append(f"{b} {_values(g, 'exec_mode')}")
    return (f"Measured: median of {_values(df, 'iters')} timed steps per process after the first step and "
            f"{_values(df, 'warmup')} untimed warm-up steps, device synchronised before each clock read; "
            f"{procs} process(es) per cell; threads {_values(df, 'threads')} (CPU settings "
            f"{_values(df, 'cpu_settings')}), device {_values(df, 'device')}, precision {_values(df, 'precision')}, "
            f"exec mode {', '.join(modes) or '?'}; machine {_values(df, 'machine_class')}.")


def caption(df, m: Metric, baseline: str | None) -> str:
    """What a table of ``m`` shows and how its figures were measured."""
    ratio = ""
    if baseline:
        ratio = (f" After the value: difference to {baseline} in percentage points." if m.name == "accuracy" else
                 f" After the value: ratio to {baseline} ({'>1 better' if m.higher_is_better else '>1 worse'}).")
    if m.source == "bench":
        spread = {"step": "[p10-p90] of every timed step of every repeat.",
                  "throughput": "samples/s = batch / median step time; [range] from the p90 and p10 step times.",
                  "gflops": "2 FLOPs per MAC of the IR, training step = 3x forward, / median step time; "
                            "[range] from the p90 and p10 step times.",
                  "first_step": "one first step per process (not timed repeatedly); [min-max] over repeats.",
                  "memory": "import, build and steps; [min-max] over repeats.",
                  "gpu_memory": "[min-max] over repeats."}[m.name]
        return f"{m.label} ({m.unit}): {spread}{ratio} {how_measured(df)}"
    if m.source == "train":
        seeds = _values(df, "seed")
        return (f"{m.label} ({m.unit}) after training on {_values(df, 'data')} for {_values(df, 'epochs')} epochs, "
                f"batch {_values(df, 'batch')}, SGD lr {_values(df, 'lr_text')} ({_values(df, 'schedule')}), "
                f"momentum {_values(df, 'momentum')}; mean over seeds {seeds} [min-max]; same initial weights, "
                f"data and batch order in every backend; threads {_values(df, 'threads')}, device "
                f"{_values(df, 'device')}.{ratio}")
    return ("largest error of the logits and of every parameter after two SGD steps, divided by its tolerance "
            "(<= 1 passes), against the float64 numpy oracle; the status follows when not 'pass'.")


def to_rich(p: Pivot, title: str | None = None):
    """The pivot as a rich renderable: the table, then how it was measured."""
    from rich.console import Group
    from rich.markup import escape
    from rich.padding import Padding
    from rich.text import Text

    from .display import table

    title = title or f"{p.metric.label} ({p.metric.unit})"
    if p.empty:
        return table(escape(title), ["no rows"], [])
    names, cols, rows = text_rows(p)
    # "[p10-p90]" would otherwise be read as rich markup and vanish
    grid = table(escape(title), [escape(c) for c in names + cols], [[escape(v) for v in r] for r in rows],
                 right=[escape(c) for c in cols])
    # The caption goes below as a paragraph of the console's width: a rich caption would wrap
    # to the (often narrow) width of the table.
    return Group(grid, Padding(Text(p.caption), (0, 0, 1, 1)))


def text_rows(p: Pivot) -> tuple[list[str], list[str], list[list[str]]]:
    """(index names, backend columns, rows of strings) of a pivot, for any renderer."""
    text = p.text()
    names = [str(n) for n in text.index.names]
    cols = [str(c) for c in text.columns]
    rows = []
    for idx, r in text.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows.append([*[str(i) for i in idx], *[str(v) for v in r.tolist()]])
    return names, cols, rows


PARITY_VERDICTS = ("pass", "fp32-bound", "mismatch")


def parity_status(df):
    """The identity status per backend from parity rows: the newest row per (backend, model, workers).

    Returns:
        A DataFrame, one row per backend (and worker count, for data-parallel rows): ``rows``,
        the counts of ``pass``, ``fp32-bound`` and ``mismatch``, ``other`` (errors, crashes,
        unsupported), ``measured`` (the dates of its rows) and ``not passing`` (each such
        model with its status, worst weight error per tolerance and known gap).
    """
    import pandas as pd

    cols = ["backend", "workers", "rows", *PARITY_VERDICTS, "other", "measured", "not passing"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(workers=df["workers"].fillna(1).astype(int) if "workers" in df else 1)
    df = newest(df, "parity")
    out = []
    for (backend, workers), g in df.groupby(["backend", "workers"], sort=True):
        counts = g["status"].value_counts()
        days = sorted({f"{d:%Y-%m-%d}" for d in pd.to_datetime(g["timestamp"], utc=True).dropna()}
                      if "timestamp" in g else ())
        measured = " to ".join(dict.fromkeys(days[:1] + days[-1:]))  # one day, or the first to the last
        notes = []
        for _, r in g[g["status"] != "pass"].sort_values("model").iterrows():
            ratio = r.get("train_worst_ratio")
            gap = r.get("known_gap")
            notes.append(f"{r['model']}: {r['status']}"
                         + (f" {ratio:.1f}x" if isinstance(ratio, (int, float)) and ratio == ratio else "")
                         + (f" (known gap: {gap})" if isinstance(gap, str) else ""))
        out.append({"backend": backend, "workers": workers, "rows": len(g),
                    **{v: int(counts.get(v, 0)) for v in PARITY_VERDICTS},
                    "other": int(len(g) - sum(counts.get(v, 0) for v in PARITY_VERDICTS)),
                    "measured": measured, "not passing": "; ".join(notes)})
    return pd.DataFrame(out, columns=cols)
