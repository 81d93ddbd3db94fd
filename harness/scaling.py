"""Data-parallel scaling: each N-worker row against the one-worker run of the same build.

Weak scaling (fixed batch per worker): efficiency = t1 / tN, the one-worker step time over
the N-worker group's (the slowest rank's); ideal 1. Strong scaling (fixed global batch B):
efficiency = t1(B) / (N * tN(B / N)); ideal 1. Speedup is the global throughput ratio
(N-worker samples per second over one worker's). The baseline row is the one-process cell of
the same backend, model, exec mode, options, precision, device and input, at the per-worker
batch (weak) or the global batch (strong), measured on the same machine class, with the
same threads per process as the group's ranks (so N x T cores against T: the comparison the
issue's benchmarks make, 2 processes x 1 thread against 1 x 1).
"""

from __future__ import annotations

SAME_BUILD = ("backend", "model", "mode", "exec_mode", "options_text", "precision", "device", "input", "threads",
              "machine_class")


def efficiencies(df):
    """The data-parallel rows of ``df`` (bench rows, samenet.tables.prepare'd) with their baseline
    step time and the scaling figures; an empty frame when there are none."""
    import pandas as pd

    from .tables import _options_text, newest

    if df.empty or "workers" not in df:
        return pd.DataFrame()
    df = newest(df, "bench")
    df = df[df["status"] == "ok"].copy()
    if df.empty:
        return pd.DataFrame()
    df["options_text"] = df["options"].map(_options_text) if "options" in df else ""
    df["workers"] = df["workers"].fillna(1).astype(int)
    for c in SAME_BUILD:
        if c not in df:
            df[c] = None
    ones = df[df["workers"] == 1]
    base = ones.groupby([*SAME_BUILD, "batch"], dropna=False)["step_median_s"].median()
    out = []
    for _, r in df[df["workers"] > 1].iterrows():
        n = int(r["workers"])
        batch = int(r["batch_per_worker"] if r["scaling"] == "weak" else r["global_batch"])
        key = (*[r[c] for c in SAME_BUILD], batch)
        t1 = base.get(key) if key in base.index else None
        t = float(r["step_median_s"])
        row = {c: r[c] for c in ("backend", "model", "exec_mode", "threads", "scaling", "machine_class")}
        row.update(workers=n, batch_per_worker=int(r["batch_per_worker"]), global_batch=int(r["global_batch"]),
                   step_s=t, step_p10_s=r.get("step_p10_s"), step_p90_s=r.get("step_p90_s"),
                   transport=r.get("transport"), grad_bytes=r.get("grad_bytes"),
                   allreduce_s=r.get("allreduce_median_s"), ring_model_s=r.get("ring_model_s"),
                   busbw=r.get("allreduce_busbw_bytes_per_s"), comm_share=r.get("comm_share"),
                   global_samples_per_s=r.get("global_samples_per_s"), one_worker_s=t1)
        if t1:
            if r["scaling"] == "weak":
                row["efficiency"] = t1 / t
                row["speedup"] = n * t1 / t
            else:
                row["efficiency"] = t1 / (n * t)
                row["speedup"] = t1 / t
            # Step time beyond the one-worker step: communication not hidden behind compute
            # (and contention), to set beside the all-reduce's own time.
            row["exposed_s"] = t - (t1 if r["scaling"] == "weak" else t1 / n)
        out.append(row)
    return pd.DataFrame(out)


def scaling_table(df, title: str = "data-parallel scaling"):
    """A rich table of :func:`efficiencies`."""
    from .display import table

    e = efficiencies(df)
    if e.empty:
        return table(title, ["no data-parallel rows"], [])

    def ms(v):
        return "" if v is None or v != v else f"{v * 1e3:.1f}"

    def pct(v):
        return "" if v is None or v != v else f"{v * 100:.0f}%"

    rows = []
    for _, r in e.sort_values(["model", "backend", "scaling", "workers"]).iterrows():
        rows.append((r["model"], r["backend"], r["scaling"], r["workers"], r["threads"], r["batch_per_worker"],
                     r["global_batch"], ms(r["one_worker_s"]), f"{ms(r['step_s'])} [{ms(r['step_p10_s'])}-"
                     f"{ms(r['step_p90_s'])}]", pct(r.get("efficiency")),
                     "" if r.get("speedup") != r.get("speedup") or r.get("speedup") is None else f"{r['speedup']:.2f}x",
                     ms(r["allreduce_s"]), ms(r["ring_model_s"]), pct(r["comm_share"]),
                     "" if not r["busbw"] else f"{r['busbw'] / 1e9:.2f}", r["transport"] or ""))
    return table(title, ["model", "backend", "scaling", "workers", "threads", "batch/w", "global",
                         "1-worker ms", "step ms [p10-p90]", "efficiency", "speedup", "all-reduce ms", "ring model ms",
                         "comm share", "busbw GB/s", "transport"], rows,
                 right=["workers", "threads", "batch/w", "global", "1-worker ms", "step ms [p10-p90]",
                        "efficiency", "speedup", "all-reduce ms", "ring model ms", "comm share", "busbw GB/s"],
                 caption="step: the slowest rank's, each step timed between barriers; efficiency: weak t1/tN, strong "
                         "t1/(N tN), against the one-process cell of the same build and threads; all-reduce: the "
                         "gradient's bytes on the same transport (median, slowest rank); ring model 2(N-1)/N S/B "
                         "with B the bus bandwidth of a 32 MiB all-reduce; comm share: all-reduce / step")
