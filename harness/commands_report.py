"""The reading commands: table (terminal comparison), report (HTML + Markdown), check (regressions)."""

from __future__ import annotations

from pathlib import Path

from .args import command, parse_list
from .errors import UsageError


def _add_selection(p, kind_help: str):
    """The options every reading command selects its rows by (table, report, check alike)."""
    p.add_argument("--results", help="results folder (default: $SAMENET_RESULTS or results/)")
    p.add_argument("--kind", default=None, help=kind_help)
    p.add_argument("--quick", action="store_true",
                   help="the rows of 'run --quick' (store 'quick'), what the tox envs measure")
    p.add_argument("--models", help="comma-separated models (default: all in the results)")
    p.add_argument("--backends", help="comma-separated backends (default: all in the results)")


def selected_kind(args) -> str:
    """The store of the timing rows: ``--kind``, else quick with ``--quick``, else bench."""
    if args.kind and args.quick and args.kind != "quick":
        raise UsageError(f"--quick reads the quick store, --kind asks for {args.kind!r}: give one of them")
    return args.kind or ("quick" if args.quick else "bench")


def _list(text: str | None, option: str) -> list[str] | None:
    return parse_list(text, option) if text else None


def load_rows(root, kind: str, sources=("bench", "train", "parity")) -> dict:
    """The rows a table or report needs: {"bench": rows of ``kind``, "train": ..., "parity": ...}."""
    from .results import default_root, load

    root = Path(root) if root else default_root()
    stores = {"bench": kind, "train": "train", "parity": "parity"}
    return {s: load(root, stores[s]) for s in sources}


def quick_filter(df):
    """The cells of ``run --quick`` measured on this machine (what the tox envs compare)."""
    from .commands_run import QUICK
    from .env import machine_class

    if df.empty:
        return df
    models = QUICK["models"].split(",")
    modes = QUICK["modes"].split(",")
    batches = [int(b) for b in QUICK["batch_sizes"].split(",")]
    keep = df["model"].isin(models) & df["mode"].isin(modes) & df["batch"].isin(batches)
    if "machine_class" in df:
        keep &= df["machine_class"] == machine_class()
    return df[keep]


def _configure_table(p):
    from .tables import DEFAULT_METRICS, METRICS

    _add_selection(p, "store of the timing rows (default: bench; quick with --quick)")
    p.add_argument("--this-machine", action="store_true", help="only rows measured on this machine class")
    p.add_argument("--baseline", default="auto",
                   help="backend the ratios refer to: a backend name, auto (torch when present) or none")
    p.add_argument("--metric", help=f"comma-separated, of {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}; "
                                    "with --quick: step,throughput,memory)")


@command("table", "Compare backends: backend x model tables of speed, memory, accuracy and parity")
def cmd_table(args) -> int:
    from .display import console
    from .env import machine_class
    from .tables import DEFAULT_METRICS, METRICS, pivot, to_rich

    kind = selected_kind(args)
    default = ("step", "throughput", "memory") if args.quick else DEFAULT_METRICS
    metrics = parse_list(args.metric, "--metric", list(METRICS)) if args.metric else list(default)
    sources = sorted({METRICS[m].source for m in metrics})
    rows = load_rows(args.results, kind, sources)
    if "bench" in rows:
        if args.quick:
            rows["bench"] = quick_filter(rows["bench"])
        elif args.this_machine and not rows["bench"].empty:
            rows["bench"] = rows["bench"][rows["bench"]["machine_class"] == machine_class()]
    if all(r.empty for r in rows.values()):
        where = args.results or "results/"
        raise UsageError(f"no rows of kind {', '.join(kind if s == 'bench' else s for s in sources)} in {where} "
                         f"(measure first: samenet run{' --quick' if args.quick else ''})")
    models, backends = _list(args.models, "--models"), _list(args.backends, "--backends")
    out = console()
    for name in metrics:
        m = METRICS[name]
        p = pivot(rows[m.source], name, args.baseline, models, backends)
        if p.empty:
            label = kind if m.source == "bench" else m.source
            out.print(f"{m.label}: no {label} rows" + (" for these models/backends" if models or backends else ""),
                      markup=False)
            continue
        out.print(to_rich(p))
    bench = rows.get("bench")
    if bench is not None and "workers" in bench and (bench["workers"].fillna(1) > 1).any():
        from .scaling import scaling_table
        from .tables import prepare, select

        out.print(scaling_table(prepare(select(bench, models, backends))))
    return 0


cmd_table.configure = _configure_table


def _configure_report(p):
    _add_selection(p, "store of the timing rows (default: bench; quick with --quick; zoo: the rows of "
                      "'run --preset zoo')")
    p.add_argument("--out", help="folder of report.html, report.md and its PNGs (default: <results>/report)")
    p.add_argument("--baseline", default="auto", help="backend the ratios refer to (auto: torch when present; none)")
    p.add_argument("--title", default="samenet report")


@command("report", "Write an HTML page and a Markdown file of tables, plots and environments from the results")
def cmd_report(args) -> int:
    from .display import console
    from .report import write
    from .results import default_root

    kind = selected_kind(args)
    root = Path(args.results) if args.results else default_root()
    frames = load_rows(root, kind)
    if args.quick:
        frames["bench"] = quick_filter(frames["bench"])
    if all(f.empty for f in frames.values()):
        raise UsageError(f"no rows in {root} (kinds {kind}, train, parity): nothing to report"
                         + (" (measure first: samenet run --quick)" if args.quick else ""))
    out_dir = Path(args.out) if args.out else root / "report"
    html_path, md_path = write(frames, out_dir, baseline=args.baseline, models=_list(args.models, "--models"),
                               backends=_list(args.backends, "--backends"), title=args.title)
    out = console()
    if not frames["bench"].empty:
        from .findings import evaluate
        from .tables import select

        for f in evaluate(select(frames["bench"], _list(args.models, "--models"), _list(args.backends, "--backends"))):
            out.print(f"finding {f.line()}", markup=False)
    out.print(f"wrote {html_path} and {md_path}", markup=False)
    return 0


cmd_report.configure = _configure_report


def _configure_check(p):
    from .check import Thresholds

    t = Thresholds()
    _add_selection(p, "store of the timing rows (default: bench; quick with --quick)")
    p.add_argument("--baseline", help="baseline name in results/baselines/ or a .json path (default: the store's name)")
    p.add_argument("--update-baseline", action="store_true",
                   help="write the run's summary into the baseline instead of checking (other configurations "
                        "already there are kept)")
    p.add_argument("--speed-tolerance", type=float, default=t.speed_pct, metavar="PCT",
                   help=f"slowdown always tolerated, percent (default {t.speed_pct:g})")
    p.add_argument("--spread-factor", type=float, default=t.spread_factor, metavar="K",
                   help=f"the speed tolerance grows to K x the combined relative IQR of both runs (default "
                        f"{t.spread_factor:g})")
    p.add_argument("--memory-tolerance", type=float, default=t.memory_pct, metavar="PCT",
                   help=f"peak RSS growth tolerated, percent (default {t.memory_pct:g}; at least "
                        f"--memory-slack MB)")
    p.add_argument("--memory-slack", type=float, default=t.memory_mb, metavar="MB",
                   help=f"peak RSS growth always tolerated (default {t.memory_mb:g})")
    p.add_argument("--accuracy-tolerance", type=float, default=t.accuracy_pp, metavar="PP",
                   help=f"accuracy drop tolerated at a fixed seed, percentage points (default {t.accuracy_pp:g})")
    p.add_argument("--parity-factor", type=float, default=t.parity_factor, metavar="X",
                   help=f"growth of a parity error/tolerance ratio tolerated, factor (default {t.parity_factor:g}; "
                        f"ratios below {t.parity_floor:g} never regress)")
    p.add_argument("--process-spread", type=float, default=t.process_spread_pct, metavar="PCT",
                   help=f"between-process spread assumed for a side measured in one process, percent (default "
                        f"{t.process_spread_pct:g}; measured instead with --repeats 2 or more)")
    p.add_argument("--verbose", action="store_true", help="list every comparison, not only what regressed")


@command("check", "Compare a run with a committed baseline; exit 1 on regression")
def cmd_check(args) -> int:
    from collections import Counter

    from .check import (IMPROVED, NEW, NOT_RUN, OK, REGRESSION, SKIPPED, Thresholds, baseline_path, compare,
                        findings_table, read_baseline, summarize, write_baseline)
    from .display import console
    from .results import default_root
    from .tables import select

    for name in ("speed_tolerance", "spread_factor", "memory_tolerance", "memory_slack", "accuracy_tolerance",
                 "parity_factor", "process_spread"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    kind = selected_kind(args)
    root = Path(args.results) if args.results else default_root()
    models, backends = _list(args.models, "--models"), _list(args.backends, "--backends")
    frames = {k: select(v, models, backends) for k, v in load_rows(root, kind).items()}
    run = summarize(frames)
    if not run:
        raise UsageError(f"no rows of kind {kind}, train or parity in {root}: nothing to check")
    name = args.baseline or kind
    path = baseline_path(name)
    out = console()
    if args.update_baseline:
        written, kept = write_baseline(path, name, run)
        out.print(f"wrote {path}: {written} entries from {root}" + (f", {kept} kept" if kept else ""), markup=False)
        return 0
    baseline = read_baseline(path)
    t = Thresholds(args.speed_tolerance, args.spread_factor, args.memory_tolerance, args.memory_slack,
                   args.accuracy_tolerance, args.parity_factor, process_spread_pct=args.process_spread)
    findings = compare(baseline["entries"], run, t)
    counts = Counter(f.verdict for f in findings)
    shown = findings if args.verbose else [f for f in findings if f.verdict in (REGRESSION, IMPROVED)]
    if shown:
        order = {REGRESSION: 0, IMPROVED: 1, SKIPPED: 2, NEW: 3, NOT_RUN: 4, OK: 5}
        shown = sorted(shown, key=lambda f: order[f.verdict])
        out.print(findings_table(shown, f"{root} against {path}"))
    skipped = Counter(f.note for f in findings if f.verdict == SKIPPED)
    for note, n in skipped.items():
        out.print(f"skipped {n} comparison(s): {note}", markup=False)
    for verdict in (NEW, NOT_RUN):
        if counts[verdict]:
            out.print(f"{counts[verdict]} configuration(s) {verdict}: " + ", ".join(
                sorted({f"{f.key.get('backend')}/{f.key.get('model')}" for f in findings if f.verdict == verdict})),
                markup=False)
    out.print(f"{len(findings)} comparisons: {counts[REGRESSION]} regression(s), {counts[IMPROVED]} improved, "
              f"{counts[OK]} ok, {counts[SKIPPED]} skipped", markup=False)
    return 1 if counts[REGRESSION] else 0


cmd_check.configure = _configure_check
