"""The regression check: a run's rows against a committed baseline, with noise-aware thresholds.

A baseline (``results/baselines/<name>.json``) holds one entry per configuration, summarised
from rows by ``summarize``; a run is summarised the same way and the two are compared entry by
entry (``compare``). The format, version ``samenet-baseline/1``::

    {"format": "samenet-baseline/1", "name": "quick", "created": "...", "git_revision": "...",
     "entries": [{"kind": "bench", "key": {"backend": "torch", "model": "lenet5", "mode": "train",
                  "batch": 16, ...}, "machine_class": "...", "status": "ok", "repeats": 3,
                  "step_median_s": 0.0024, "step_rel_spread": 0.035, "peak_rss_mb": 414.2,
                  "params_trainable": 61706, "params_non_trainable": 0, "macs_per_sample": 416520,
                  "spec_hash": "30cbb9d3e0f84f81", "framework_version": "2.13.0+cpu"},
                 {"kind": "train", "key": {...,"seed": 0}, "status": "ok", "final_test_acc": 0.85},
                 {"kind": "parity", "key": {"backend": "torch", "model": "lenet5"}, "status": "pass",
                  "parity_ratio": 0.002}]}

Rules (``Thresholds`` holds the numbers):

* Speed: the median step time over repeats (each repeat is itself a median of timed steps).
  A slowdown is a regression when run / baseline - 1 exceeds
  ``max(speed_pct, spread_factor * sqrt(spread_base**2 + spread_run**2))``, where a side's spread
  is the larger of its within-process relative IQR and its between-process spread: measured
  over its repeats (fresh processes), or assumed ``process_spread_pct`` (15 %) for a side of one
  process, whose steps cannot show how far another process's would drift (the output says so).
  Noisy measurements get a wider tolerance instead of false alarms; a 2x slowdown is always
  caught (2 x hypot(15 %, 15 %) = 42 %). Timings are only
  compared when the baseline was measured on the same machine class; otherwise they are
  reported as skipped.
* Memory: peak RSS may grow by ``max(memory_pct of the baseline, memory_mb)``, compared on the
  same machine class only (thread pools and ISA-specific kernels size themselves by the CPU).
* Machine-independent quantities are compared exactly: trainable and non-trainable parameter
  counts and MACs per sample (a changed spec hash makes the speed and memory comparison
  meaningless, so they are skipped with that reason).
* Accuracy at a fixed seed may drop by at most ``accuracy_pp`` percentage points.
* Parity: a status that stops passing is a regression, and so is an error/tolerance ratio that
  grows past ``max(parity_factor * baseline, parity_floor)`` (errors far inside the tolerance
  move with library versions; only growth towards the tolerance matters).
* Data-parallel scaling: the efficiency of an N-worker entry against its one-worker run
  (samenet.scaling) may drop by ``scaling_pp`` percentage points (or twice its spread), same
  machine class only.
* Status: a configuration that was ok and now fails (error, oom, timeout, crash) regressed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import UsageError

FORMAT = "samenet-baseline/1"
KEYS = {
    "bench": ("backend", "model", "mode", "batch", "input", "device", "precision", "exec_mode", "options", "threads",
              "cpu_settings", "workers", "scaling"),
    "train": ("backend", "model", "data", "epochs", "batch", "lr", "schedule", "momentum", "weight_decay", "seed",
              "device", "exec_mode"),
    "parity": ("backend", "model", "workers"),
}
EXACT = ("params_trainable", "params_non_trainable", "macs_per_sample")
REGRESSION, IMPROVED, OK, SKIPPED, NEW, NOT_RUN = "REGRESSION", "improved", "ok", "skipped", "new", "not run"


@dataclass
class Thresholds:
    """The tolerances of ``compare`` (percentages as percent, accuracy in percentage points)."""

    speed_pct: float = 10.0
    spread_factor: float = 2.0
    memory_pct: float = 10.0
    memory_mb: float = 20.0
    accuracy_pp: float = 0.5
    scaling_pp: float = 5.0
    parity_factor: float = 2.0
    parity_floor: float = 0.05
    process_spread_pct: float = 15.0
    """The between-process spread assumed for a side measured in one process: step times of
    fresh processes drift apart by more than one process's IQR (27 % seen for a 1.5 ms step)."""


@dataclass
class Finding:
    """One comparison: what, the two values, the change and the allowed change, and the verdict."""

    kind: str
    key: dict
    quantity: str
    verdict: str
    baseline: str = ""
    run: str = ""
    change: str = ""
    allowed: str = ""
    note: str = ""

    def label(self) -> str:
        k = self.key
        if self.kind == "train":
            return f"{k.get('data')}, {k.get('epochs')} epochs, batch {k.get('batch')}, lr {k.get('lr')}, seed {k.get('seed')}"
        parts = [str(k.get(c)) for c in ("mode", "batch", "input", "exec_mode", "options", "precision", "device")
                 if k.get(c) not in (None, "", "None")]
        return " ".join(parts)


def _plain(v):
    """A JSON value that compares equal for equal configurations (numpy scalars, NaN, dicts)."""
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items()))
    if isinstance(v, (list, tuple)):
        return _plain(v[0]) if v else None  # train rows: the learning rate of every epoch
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if v != v:
            return None
        if v.is_integer() and abs(v) < 2**53:
            return int(v)  # a column with gaps is float in pandas
    return v


def _key(row, kind: str) -> dict:
    from .tables import _options_text

    key = {c: _options_text(row.get(c)) if c == "options" else _plain(row.get(c)) for c in KEYS[kind]}
    if key.get("workers", 1) in (None, 1):  # one process: the key before data parallel
        key.pop("workers", None)
        key.pop("scaling", None)
    return key


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _num(v) -> float | None:
    v = _plain(v)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _between_spread(ok) -> float | None:
    """Relative spread of the repeats' medians (IQR over the median; for two, their difference
    over their mean); None for one process, which cannot show it."""
    med = ok["step_median_s"].astype(float).to_numpy()
    if len(med) < 2:
        return None
    if len(med) == 2:
        return float(abs(med[0] - med[1]) / med.mean())
    q1, q3 = np.percentile(med, [25, 75])
    return float((q3 - q1) / np.median(med))


def _rel_spread(ok) -> float:
    """Relative IQR of a configuration's step times: within a process or between repeats, the larger."""
    med = ok["step_median_s"].astype(float)
    within = float(np.nanmedian(ok["step_iqr_s"].astype(float) / med)) if "step_iqr_s" in ok else 0.0
    between = 0.0
    if len(med) > 1:
        q1, q3 = np.percentile(med, [25, 75])
        between = float((q3 - q1) / np.median(med))
    return max(within if within == within else 0.0, between)


def _speed_spread(e: dict, t: Thresholds) -> float:
    """A side's relative spread for the speed verdict: the larger of its within-process IQR
    and its between-process spread (measured with two or more processes, else assumed)."""
    within = e.get("step_rel_spread") or 0.0
    if (e.get("repeats") or 1) < 2:
        return max(within, t.process_spread_pct / 100)
    between = e.get("step_between_spread")
    return max(within, between if between is not None else within)


def summarize(frames: dict) -> list[dict]:
    """Baseline entries from rows: {"bench": DataFrame, "train": ..., "parity": ...} (any may be missing)."""
    from .tables import newest, prepare

    entries = []
    for kind in ("bench", "train", "parity"):
        df = frames.get(kind)
        if df is None or df.empty:
            continue
        df = newest(prepare(df), kind)
        scaling = {}
        if kind == "bench":
            from .scaling import efficiencies

            eff = efficiencies(df)
            for _, r in (eff.iterrows() if not eff.empty else []):
                scaling[(r["backend"], r["model"], r["workers"], r["scaling"], r["global_batch"])] = r.get("efficiency")
        groups: dict[str, list] = {}
        for i, (_, r) in enumerate(df.iterrows()):
            groups.setdefault(key_text(_key(r, kind)), []).append(i)
        for text, idx in groups.items():
            g = df.iloc[idx]
            last = g.iloc[-1]
            ok = g[g["status"].isin(["ok", "pass"])]
            e = {"kind": kind, "key": json.loads(text),
                 "status": ("ok" if len(ok) else str(last["status"])) if kind != "parity" else str(last["status"]),
                 "framework_version": _plain(last.get("framework_version"))}
            if kind == "bench":
                e.update(machine_class=_plain(last.get("machine_class")), repeats=int(len(ok)),
                         spec_hash=_plain(last.get("spec_hash")))
                src = ok if len(ok) else g
                for c in EXACT:
                    e[c] = _plain(src.iloc[-1].get(c))
                if len(ok):
                    e["step_median_s"] = float(np.median(ok["step_median_s"].astype(float)))
                    e["step_rel_spread"] = _rel_spread(ok)
                    e["step_between_spread"] = _between_spread(ok)
                    e["peak_rss_mb"] = float(np.median(ok["peak_rss_mb"].astype(float)))
                    workers = _plain(last.get("workers"))
                    if workers and workers > 1:
                        eff = scaling.get((last["backend"], last["model"], workers, last.get("scaling"),
                                           _plain(last.get("global_batch"))))
                        if eff is not None and eff == eff:
                            e["scaling_efficiency"] = float(eff)
            elif kind == "train" and len(ok):
                e["final_test_acc"] = float(ok["final_test_acc"].astype(float).mean())
            elif kind == "parity":
                vals = [_num(last.get(c)) for c in ("fwd_worst_ratio", "train_worst_ratio")]
                vals = [v for v in vals if v is not None]
                e["parity_ratio"] = max(vals) if vals else None
                if isinstance(last.get("known_gap"), str):
                    e["known_gap"] = last["known_gap"]
            entries.append(e)
    return entries


def _fmt(v, unit: str = "") -> str:
    from .tables import fmt_value

    if v is None:
        return ""
    return f"{fmt_value(float(v))}{unit}" if isinstance(v, (int, float)) else str(v)


def _compare_bench(b: dict, r: dict, t: Thresholds, out: list) -> None:
    def add(quantity, verdict, **kw):
        out.append(Finding("bench", r["key"], quantity, verdict, **kw))

    for c in EXACT:
        if b.get(c) is not None and r.get(c) is not None and b[c] != r[c]:
            add(c, REGRESSION, baseline=_fmt(b[c]), run=_fmt(r[c]), change=f"{r[c] - b[c]:+,}", allowed="exact",
                note="the network changed: update the baseline if intended")
        elif b.get(c) is not None and r.get(c) is not None:
            add(c, OK, baseline=_fmt(b[c]), run=_fmt(r[c]), allowed="exact")
    if b["status"] == "ok" and r["status"] != "ok":
        add("status", REGRESSION, baseline="ok", run=r["status"])
        return
    if b["status"] != "ok":
        add("status", IMPROVED if r["status"] == "ok" else OK, baseline=b["status"], run=r["status"])
        return
    if b.get("spec_hash") and r.get("spec_hash") and b["spec_hash"] != r["spec_hash"]:
        add("step time, memory", SKIPPED, note="spec changed (spec hash differs)")
        return
    if b.get("machine_class") != r.get("machine_class"):
        # Peak RSS is machine-dependent too: thread pools and ISA-specific kernels (oneDNN
        # scratchpads) size themselves by the CPU.
        add("step time, peak RSS", SKIPPED, note=f"different machine class (baseline "
                                                 f"'{b.get('machine_class')}', run '{r.get('machine_class')}')")
        return
    bm, rm = b.get("peak_rss_mb"), r.get("peak_rss_mb")
    if bm is not None and rm is not None:
        allowed = max(t.memory_pct / 100 * bm, t.memory_mb)
        verdict = REGRESSION if rm - bm > allowed else IMPROVED if bm - rm > allowed else OK
        add("peak RSS MB", verdict, baseline=_fmt(bm), run=_fmt(rm), change=f"{rm - bm:+.0f} MB",
            allowed=f"+{allowed:.0f} MB")
    bs, rs = b.get("step_median_s"), r.get("step_median_s")
    if bs and rs:
        sb, sr = _speed_spread(b, t), _speed_spread(r, t)
        spread = math.hypot(sb, sr)
        tol = max(t.speed_pct / 100, t.spread_factor * spread)
        change = rs / bs - 1
        verdict = REGRESSION if change > tol else IMPROVED if bs / rs - 1 > tol else OK
        single = [side for side, e in (("baseline", b), ("run", r)) if (e.get("repeats") or 1) < 2]
        add("step time", verdict, baseline=_fmt(bs * 1e3, " ms"), run=_fmt(rs * 1e3, " ms"),
            change=f"{change * 100:+.1f}%", allowed=f"+{tol * 100:.1f}%",
            note=f"spread {sb * 100:.1f}% / {sr * 100:.1f}% (baseline / run), {b.get('repeats')} / "
                 f"{r.get('repeats')} processes" + (
                     f"; one process on the {' and '.join(single)} side: its between-process spread is assumed "
                     f"{t.process_spread_pct:g}% (--repeats 3 measures it)" if single else ""))
    _compare_scaling(b, r, t, out)


def _compare_scaling(b: dict, r: dict, t: Thresholds, out: list) -> None:
    """Data-parallel scaling efficiency may drop by ``scaling_pp`` points, or the entries' spread."""
    be, re_ = b.get("scaling_efficiency"), r.get("scaling_efficiency")
    if be is None or re_ is None or b.get("machine_class") != r.get("machine_class"):
        return
    spread = math.hypot(b.get("step_rel_spread") or 0.0, r.get("step_rel_spread") or 0.0) * be
    allowed = max(t.scaling_pp / 100, t.spread_factor * spread)
    drop = be - re_
    verdict = REGRESSION if drop > allowed else IMPROVED if -drop > allowed else OK
    out.append(Finding("bench", r["key"], "scaling efficiency", verdict, baseline=f"{be * 100:.0f}%",
                       run=f"{re_ * 100:.0f}%", change=f"{-drop * 100:+.1f} pp", allowed=f"-{allowed * 100:.1f} pp"))


def _compare_train(b: dict, r: dict, t: Thresholds, out: list) -> None:
    if b["status"] == "ok" and r["status"] != "ok":
        out.append(Finding("train", r["key"], "status", REGRESSION, "ok", r["status"]))
        return
    ba, ra = b.get("final_test_acc"), r.get("final_test_acc")
    if ba is None or ra is None:
        return
    drop = (ba - ra) * 100
    verdict = REGRESSION if drop > t.accuracy_pp else IMPROVED if -drop > t.accuracy_pp else OK
    out.append(Finding("train", r["key"], "final test accuracy", verdict, f"{ba * 100:.2f}%", f"{ra * 100:.2f}%",
                       f"{-drop:+.2f} pp", f"-{t.accuracy_pp:g} pp"))


def _compare_parity(b: dict, r: dict, t: Thresholds, out: list) -> None:
    if b["status"] == "pass" and r["status"] != "pass":
        out.append(Finding("parity", r["key"], "status", REGRESSION, "pass", r["status"],
                           note=str(r.get("known_gap") or "")))
        return
    if b["status"] != "pass" and r["status"] == "pass":
        out.append(Finding("parity", r["key"], "status", IMPROVED, b["status"], "pass"))
    bp, rp = b.get("parity_ratio"), r.get("parity_ratio")
    if bp is None or rp is None:
        return
    allowed = max(t.parity_factor * bp, t.parity_floor)
    verdict = REGRESSION if rp > allowed and rp > bp else OK
    out.append(Finding("parity", r["key"], "error / tolerance", verdict, _fmt(bp), _fmt(rp),
                       f"x{rp / bp:.2f}" if bp else "", f"<= {_fmt(allowed)}"))


def compare(baseline: list[dict], run: list[dict], t: Thresholds | None = None) -> list[Finding]:
    """Findings of a run's entries against a baseline's (both from ``summarize``).

    Baseline entries of backends absent from the run are ignored (a CI job measures one
    backend); those of a backend present but a configuration absent are reported as not run.
    """
    t = t or Thresholds()
    base = {(e["kind"], key_text(e["key"])): e for e in baseline}
    seen = set()
    out: list[Finding] = []
    compare_kind = {"bench": _compare_bench, "train": _compare_train, "parity": _compare_parity}
    for r in run:
        k = (r["kind"], key_text(r["key"]))
        seen.add(k)
        if k not in base:
            out.append(Finding(r["kind"], r["key"], "configuration", NEW, note="not in the baseline"))
            continue
        compare_kind[r["kind"]](base[k], r, t, out)
    run_backends = {(r["kind"], r["key"].get("backend")) for r in run}
    for k, b in base.items():
        if k not in seen and (b["kind"], b["key"].get("backend")) in run_backends:
            out.append(Finding(b["kind"], b["key"], "configuration", NOT_RUN, note="in the baseline, not in this run"))
    return out


def baseline_path(name: str, root: Path | None = None) -> Path:
    """``results/baselines/<name>.json`` of the current folder (where a project commits its
    baselines), or ``name`` itself when it is a path to a .json file."""
    if name.endswith(".json") or "/" in name:
        return Path(name)
    return (root or Path.cwd() / "results" / "baselines") / f"{name}.json"


TEXT_FIELDS = ("kind", "key", "status", "known_gap", "framework_version", "machine_class", "spec_hash")
"""Entry fields that are not numbers (every other field is a number or null)."""


def read_baseline(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"no baseline {path} (write one from a run with: samenet check --update-baseline)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise UsageError(f"{path}: not a samenet baseline (expected \"format\": \"{FORMAT}\" and \"entries\")")
    for i, e in enumerate(data["entries"]):
        where = f"{path}: $.entries[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("kind"), str) or not isinstance(e.get("key"), dict):
            raise UsageError(f"{where}: expected an object with a \"kind\" string and a \"key\" object")
        for name, value in e.items():
            if name not in TEXT_FIELDS and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
                raise UsageError(f"{where}.{name}: expected a number or null, got {json.dumps(value)[:40]}")
    return data


def write_baseline(path: Path, name: str, entries: list[dict], merge: bool = True) -> tuple[int, int]:
    """Writes entries; with ``merge`` the existing entries of other configurations are kept.

    Returns:
        (entries written from this run, entries kept from the old baseline).
    """
    from .env import git_revision

    old = read_baseline(path)["entries"] if merge and path.is_file() else []
    new_keys = {(e["kind"], key_text(e["key"])) for e in entries}
    kept = [e for e in old if (e["kind"], key_text(e["key"])) not in new_keys]
    rev, dirty = git_revision()
    data = {"format": FORMAT, "name": Path(name).stem, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_revision": rev, "git_dirty": dirty,
            "thresholds_note": "see harness/check.py; thresholds are options of samenet check, not stored here",
            "entries": sorted(kept + entries, key=lambda e: (e["kind"], key_text(e["key"])))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    return len(entries), len(kept)


def findings_table(findings: list[Finding], title: str):
    """A rich table of findings."""
    from rich.markup import escape

    from .display import table

    cols = ["verdict", "rows", "backend", "model", "configuration", "quantity", "baseline", "run", "change", "allowed",
            "note"]
    rows = [[f.verdict, f.kind, str(f.key.get("backend")), str(f.key.get("model")), f.label(), f.quantity, f.baseline,
             f.run, f.change, f.allowed, f.note] for f in findings]
    return table(escape(title), cols, [[escape(v) for v in r] for r in rows], right=["baseline", "run", "change",
                                                                                       "allowed"])


def as_dict(f: Finding) -> dict:
    return asdict(f)
