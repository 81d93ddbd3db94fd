"""The measuring commands: run (speed and memory), parity (proof of identity), train (accuracy)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from . import backend as registry
from . import zoo
from .cell import MODES, Cell
from .distributed import SCALINGS
from .args import command, parse_list, parse_shape, positive_seconds
from .display import console, table
from .errors import UsageError
from .results import Store, latest
from .runner import expand, python_for, sweep

QUICK = {"models": "lenet5,resnet18", "modes": "train,infer", "batch_sizes": "16", "warmup": 3, "iters": 10}
# Presets of cells: per preset, the (modes, batch sizes) groups whose cells are measured, and
# the store their rows go to. The zoo preset is what the report's analysis charts and findings
# need: inference at two batch sizes (for the charts against batch size), training at batch 16
# only (a batch-1 training step measures little beyond per-step overhead).
PRESETS = {"zoo": {"groups": ((("infer",), (1, 16)), (("train",), (16,))), "store": "zoo"}}


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option}: expected positive integers, got '{text}'")
    return values


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{option}: expected NAME=VALUE, got '{item}'")
        out[key] = value
    return out


def _configure(p):
    p.add_argument("--backends", default="torch",
                   help="comma-separated backends, or 'all': every framework backend, not the numpy reference "
                   "(default: torch)")
    p.add_argument("--models", help="comma-separated models, or 'all' (default: lenet5,resnet18; with --preset zoo: "
                                    "every spec)")
    p.add_argument("--modes", help="train,infer (default: both; not with --preset)")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (default: 16; not with --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="zoo: every spec (or --models), inference at batch 1 and 16 and training at batch 16; rows "
                        "go to the 'zoo' store (samenet report --kind zoo: analysis charts and findings)")
    p.add_argument("--input", help="input CxHxW instead of each spec's default")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] (gpu is an alias), ascend[:N]")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(registry.PRECISIONS)}")
    p.add_argument("--exec-mode", action="append", metavar="[BACKEND=]MODE",
                   help="execution mode, for all backends or one (repeatable); default: each backend's first")
    p.add_argument("--option", action="append", metavar="[BACKEND.]NAME=VALUE",
                   help="backend option, e.g. memory_format=channels_last (repeatable)")
    p.add_argument("--threads", type=int, help="core budget for every framework (default: the CPUs this process may use)")
    p.add_argument("--cpu-settings", choices=["tuned", "stock"], default="tuned",
                   help="tuned: each framework's best-practice CPU settings for the core budget; stock: its defaults")
    p.add_argument("--workers", default="1", help="data-parallel processes per training cell, comma-separated "
                   "(e.g. 1,2): each through its framework's own engine, on 127.0.0.1 (default 1)")
    p.add_argument("--hosts", metavar="ADDR,ADDR,...",
                   help="with --workers: one group across these hosts (node-rank order), the workers split evenly; "
                        "run the same command on every host with its own --node-rank (unverified: "
                        "docs/data-parallel.md)")
    p.add_argument("--node-rank", type=int, help="with --hosts: this host's index in --hosts")
    p.add_argument("--rendezvous-port", type=int,
                   help="with --hosts: the group's first port, free on every host (the engine takes the ones after "
                        "it that it needs, e.g. one per rank for TensorFlow)")
    p.add_argument("--scaling", choices=SCALINGS, default="weak",
                   help="with --workers: weak keeps the batch per worker (the global batch grows), strong keeps "
                        "the global batch (split over the workers) (default weak)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps after the first step (default 5)")
    p.add_argument("--iters", type=int, help="timed steps (default 20)")
    p.add_argument("--repeats", type=int, default=1, help="processes per cell, for between-run spread (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=positive_seconds, default=1800, help="seconds per cell before it is killed (default 1800)")
    p.add_argument("--results", help="results folder (default: $SAMENET_RESULTS or results/)")
    p.add_argument("--store", default="bench", help="kind of rows / subfolder (default: bench)")
    p.add_argument("--force", action="store_true", help="rerun cells already in the results")
    p.add_argument("--retry-failed", action="store_true",
                   help="rerun cells whose newest row is an error, crash, timeout or oom (not unsupported)")
    p.add_argument("--python", action="append", metavar="BACKEND=PATH", help="interpreter of a backend's env")
    p.add_argument("--quick", action="store_true",
                   help="the quick default suite: lenet5 and resnet18, train and infer, batch 16, 3 warm-up, 10 timed; "
                        "rows go to the 'quick' store and the table compares every backend run there on this machine")
    p.add_argument("--compare", action="store_true",
                   help="end with the latest rows of every backend in the store (this machine), not only this sweep's")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_executor_options(p)


def add_executor_options(p):
    """``--executor`` and its options (samenet.executors; docs/executors.md)."""
    from .executors import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where cells run: local subprocesses, Ray tasks or Slurm jobs (default local)")
    p.add_argument("--jobs", type=int, default=1,
                   help="local executor: correctness cells at once (timing cells always run one at a time; default 1)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="--executor ray: join this cluster (default: a Ray instance on 127.0.0.1 for this command)")
    p.add_argument("--slurm-partition", metavar="NAME", help="--executor slurm: partition of every job")
    p.add_argument("--slurm-time", metavar="MINUTES|H:MM:SS",
                   help="--executor slurm: time limit per job (default: --timeout plus 5 minutes)")
    p.add_argument("--slurm-folder", metavar="DIR",
                   help="--executor slurm: submitit's job files and logs (default: RESULTS/slurm-jobs)")


def executor_from_args(args, store: Store, timing: bool = True):
    """The executor the options name; a bad combination is a one-line error (exit 2)."""
    from .executors import LocalExecutor, RayExecutor, SlurmExecutor, parse_minutes, require

    if args.jobs < 1:
        raise UsageError(f"--jobs: must be positive, got {args.jobs}")
    if args.jobs > 1 and args.executor != "local":
        raise UsageError("--jobs: only with --executor local (Ray and Slurm run as many cells as fit)")
    if args.jobs > 1 and timing:
        raise UsageError("--jobs: timing cells (every cell of 'samenet run') never share cores and run one at a "
                         "time; --jobs is for correctness work")
    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray-address: only with --executor ray")
    slurm = [o for o, v in (("--slurm-partition", args.slurm_partition), ("--slurm-time", args.slurm_time),
                            ("--slurm-folder", args.slurm_folder)) if v]
    if slurm and args.executor != "slurm":
        raise UsageError(f"{slurm[0]}: only with --executor slurm")
    if args.executor == "ray":
        require("ray", "ray", "ray")  # fail now, not after the first cell
        return RayExecutor(args.ray_address)
    if args.executor == "slurm":
        require("submitit", "slurm", "slurm")
        minutes = parse_minutes(args.slurm_time, "--slurm-time") if args.slurm_time else None
        return SlurmExecutor(args.slurm_folder or store.root / "slurm-jobs", args.slurm_partition, minutes)
    return LocalExecutor(args.jobs)


def cells_from_args(args) -> list[Cell]:
    known = registry.names()
    # Loading every backend's metadata for "all" only: a broken one must not stop a run of others.
    everything = registry.framework_names() if args.backends.strip() == "all" else None
    backends = parse_list(args.backends, "--backends", known, everything)
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None
    if preset:
        given = [o for o, v in (("--modes", args.modes), ("--batch-sizes", args.batch_sizes), ("--quick", args.quick))
                 if v]
        if given:
            raise UsageError(f"{given[0]}: not with --preset {args.preset}, which sets its own modes and batch sizes")
    default_models = ",".join(zoo.names()) if preset else QUICK["models"]
    models = parse_list(default_models if args.models is None else args.models, "--models", None,
                        zoo.names())
    for m in models:
        zoo.path_of(m)  # unknown model: one-line error now, not one failed row per cell
    modes = parse_list(args.modes or QUICK["modes"], "--modes", list(MODES))
    batches = _ints(args.batch_sizes or QUICK["batch_sizes"], "--batch-sizes")
    groups = [(list(m), list(b)) for m, b in preset["groups"]] if preset else [(modes, batches)]
    modes = sorted({m for g, _ in groups for m in g})
    batches = sorted({b for _, g in groups for b in g})  # every batch the cells use (the strong-scaling check)
    registry.split_device(args.device)
    if args.precision not in registry.PRECISIONS:
        raise UsageError(f"--precision: unknown '{args.precision}' (known: {', '.join(registry.PRECISIONS)})")
    for name, value in (("--threads", args.threads), ("--warmup", args.warmup), ("--iters", args.iters),
                        ("--repeats", args.repeats)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UsageError(f"{name}: must be {'>= 0' if name == '--warmup' else 'positive'}, got {value}")
    exec_modes: dict[str, str] = {}
    for item in args.exec_mode or []:
        b, sep, mode = item.rpartition("=")
        for name in ([b] if sep else backends):
            if name not in backends:
                raise UsageError(f"--exec-mode: backend '{name}' is not in --backends")
            cls = registry.get(name)
            if mode not in cls.exec_modes:
                raise UsageError(f"--exec-mode: backend {name} has no mode '{mode}' (modes: {', '.join(cls.exec_modes)})")
            exec_modes[name] = mode
    options: dict[str, dict[str, str]] = {b: {} for b in backends}
    for key, value in _pairs(args.option, "--option").items():
        b, dot, name = key.rpartition(".")
        targets = [b] if dot else [x for x in backends if name in registry.get(x).options]
        if not targets:
            raise UsageError(f"--option: no backend among {', '.join(backends)} has option '{name}'")
        for t in targets:
            cls = registry.get(t)
            if name not in cls.options or value not in cls.options[name]:
                raise UsageError(f"--option: backend {t} option {name} takes {', '.join(cls.options.get(name, ())) or 'nothing'}")
            options[t][name] = value
    shape = parse_shape(args.input) if args.input else None
    common = dict(input=shape, device=args.device, precision=args.precision,
                  threads=args.threads or registry.default_threads(), cpu_settings=args.cpu_settings,
                  warmup=args.warmup if args.warmup is not None else (QUICK["warmup"] if args.quick else 5),
                  iters=args.iters or (QUICK["iters"] if args.quick else 20), seed=args.seed)
    workers = _ints(args.workers, "--workers")
    budget = registry.default_threads()
    if max(workers) > 1:
        if "infer" in modes and args.modes:
            raise UsageError("--workers: data-parallel cells train; use --modes train")
        lacking = [b for b in backends if not registry.get(b).capabilities.data_parallel]
        if lacking:
            why = registry.get(lacking[0]).gap_reason("dp:*")
            raise UsageError(f"--workers: backend {lacking[0]} declares no data-parallel training"
                             + (f" ({why})" if why else ""))
    hosts = hosts_from_args(args, workers)
    per_host = max(workers) // max(1, len(hosts))  # ranks on each host
    if max(workers) > 1:
        if args.threads and per_host * args.threads > budget:
            raise UsageError(f"--workers {max(workers)} x --threads {args.threads} exceeds the core budget of {budget}"
                             + (f" ({per_host} ranks on each of {len(hosts)} hosts)" if hosts else ""))
        if args.scaling == "strong":
            bad = [b for b in batches for n in workers if b % n]
            if bad:
                raise UsageError(f"--scaling strong: batch {bad[0]} does not split evenly over --workers {args.workers}")
    # One expansion per group, then in model order (a partial sweep has whole models), without duplicates.
    cells = [c for g_modes, g_batches in groups
             for c in expand(backends, models, g_modes, g_batches, args.repeats, **common)]
    seen: set[str] = set()
    cells = [c for c in cells if not (c.key() in seen or seen.add(c.key()))]
    cells.sort(key=lambda c: models.index(c.model))
    from dataclasses import replace

    cells = [replace(c, exec_mode=exec_modes.get(c.backend), options=tuple(sorted(options[c.backend].items())))
             for c in cells]
    if workers == [1]:
        return cells
    # Each worker count of a training cell; unless given, every cell's threads are the budget's
    # share of the largest group, so N x T is compared with 1 x T (the same build).
    threads = args.threads or max(1, budget // per_host)
    group = dict(hosts=hosts, node_rank=args.node_rank or 0, rendezvous_port=args.rendezvous_port or 0) if hosts else {}
    return [replace(c, workers=n, scaling=args.scaling, threads=threads, **group)
            for c in cells if c.mode == "train" for n in workers]


def hosts_from_args(args, workers: list[int]) -> tuple[str, ...]:
    """``--hosts``, checked with ``--node-rank`` and ``--rendezvous-port``; () for one host."""
    given = [o for o, v in (("--node-rank", args.node_rank), ("--rendezvous-port", args.rendezvous_port))
             if v is not None]
    if not args.hosts:
        if given:
            raise UsageError(f"{given[0]}: only with --hosts")
        return ()
    hosts = tuple(h.strip() for h in args.hosts.split(","))
    if len(hosts) < 2 or not all(hosts):
        raise UsageError(f"--hosts: expected two or more comma-separated addresses, got '{args.hosts}'")
    if args.node_rank is None or args.rendezvous_port is None:
        raise UsageError("--hosts: needs --node-rank (this host's index in --hosts) and --rendezvous-port "
                         "(the same free port on every host)")
    if not 0 <= args.node_rank < len(hosts):
        raise UsageError(f"--node-rank: must be 0..{len(hosts) - 1} for {len(hosts)} hosts, got {args.node_rank}")
    if not 1024 <= args.rendezvous_port <= 65535 - 64:
        raise UsageError(f"--rendezvous-port: must be 1024..{65535 - 64}, got {args.rendezvous_port}")
    bad = [n for n in workers if n < len(hosts) or n % len(hosts)]
    if bad:
        raise UsageError(f"--hosts: --workers {bad[0]} does not split evenly over {len(hosts)} hosts "
                         f"(every host runs the same number of ranks)")
    if args.executor != "local":
        raise UsageError("--hosts: only with --executor local (run one samenet per host; Ray and Slurm place "
                         "cells themselves)")
    return hosts


def how_measured(df) -> str:
    """One paragraph saying how the timings in ``df`` were measured (see samenet.tables)."""
    from .tables import how_measured as measured

    return measured(df) + " p10-p90 of the steps in brackets; the first step includes tracing/compilation."


def results_table(df, title: str):
    """Terminal table of bench rows, one line per cell, with ratios to the fastest backend."""
    if df.empty:
        return table(title, ["no rows"], [])
    df = df.sort_values(["model", "mode", "batch", "backend"], kind="stable")
    ok = df[df["status"] == "ok"]
    best = ok.groupby(["model", "mode", "batch", "input"])["step_median_s"].min() if not ok.empty else None
    rows = []
    for _, r in df.iterrows():
        if r["status"] == "ok":
            ratio = r["step_median_s"] / best.loc[(r["model"], r["mode"], r["batch"], r["input"])]
            workers = r.get("workers")
            workers = f" x{int(workers)} {r.get('scaling')}" if workers == workers and workers and workers > 1 else ""
            rows.append((r["model"], r["mode"], f"{r['batch']}{workers}", r["input"], r["backend"],
                         r.get("exec_mode") or "",
                         f"{r['step_median_s'] * 1e3:.1f} [{r['step_p10_s'] * 1e3:.1f}-{r['step_p90_s'] * 1e3:.1f}]",
                         f"{ratio:.2f}x", f"{r['samples_per_s']:.1f}", f"{r['gflops_per_s']:.1f}",
                         f"{r['peak_rss_mb']:.0f}", f"{r['first_step_s']:.2f}", f"{r['import_s']:.1f}", "ok"))
        else:
            rows.append((r["model"], r["mode"], r["batch"], r.get("input") or "", r["backend"], r.get("exec_mode") or "",
                         "", "", "", "", "", "", "", f"{r['status']}: {str(r.get('error', ''))[:80]}"))
    return table(title, ["model", "mode", "batch", "input", "backend", "exec", "step ms [p10-p90]", "vs best",
                         "img/s", "GFLOP/s", "peak RSS MB", "first step s", "import s", "status"], rows,
                 right=["batch", "step ms [p10-p90]", "vs best", "img/s", "GFLOP/s", "peak RSS MB", "first step s",
                        "import s"],
                 caption=how_measured(df))


@command("run", "Measure: a sweep of (backend, model, mode, batch) cells, each in its own process")
def cmd_run(args) -> int:
    from .env import machine_class
    from .results import load

    store_kind = "quick" if args.quick and args.store == "bench" else args.store
    if args.preset and args.store == "bench":
        store_kind = PRESETS[args.preset]["store"]
    store = Store(args.results, store_kind)
    cells = cells_from_args(args)
    overrides = _pairs(args.python, "--python")
    pythons = {b: python_for(b, overrides) for b in {c.backend for c in cells}}
    with executor_from_args(args, store) as executor:
        rows = sweep(cells, store, pythons.__getitem__, args.timeout, force=args.force, progress=not args.quiet,
                     retry_failed=args.retry_failed, executor=executor)
    out = console()
    import pandas as pd

    if args.compare or args.quick:
        df = latest(load(store.root, store_kind))
        if not df.empty:
            df = df[df["machine_class"] == machine_class()]
            wanted = {(c.model, c.mode, c.batch) for c in cells}
            df = df[[(m, mo, b) in wanted for m, mo, b in zip(df["model"], df["mode"], df["batch"])]]
        title = f"latest results in {store.dir} on this machine ({machine_class()})"
    else:
        df = pd.DataFrame(rows)
        title = f"{len(rows)} cells measured" + (f" ({len(cells) - len(rows)} already in the results)"
                                                  if len(rows) < len(cells) else "")
    out.print(results_table(df, title))
    if any(c.workers > 1 for c in cells):
        from .scaling import scaling_table
        from .tables import prepare

        store_rows = latest(load(store.root, store_kind))
        out.print(scaling_table(prepare(store_rows[store_rows["machine_class"] == machine_class()])))
    failed = [r for r in rows if r.get("status") != "ok"]
    return 1 if failed and len(failed) == len(rows) else 0


cmd_run.configure = _configure


def parity_table(df, model: str):
    from .conformance import ATOL, LOSS_RTOL, RTOL, WEIGHT_ATOL, WEIGHT_RTOL

    rows = []
    for _, r in df[df["model"] == model].iterrows():
        def num(key, fmt):
            v = r.get(key)
            return "" if v is None or v != v else format(v, fmt)

        status = r["status"] + (f" (known gap: {r['known_gap']})" if isinstance(r.get("known_gap"), str) else "")
        rows.append((r["backend"], num("fwd_max_abs", ".1e"), num("fwd_rel", ".1e"), num("fwd_worst_ratio", ".2f"),
                     num("loss_rel_diff", ".1e"), num("train_max_abs", ".1e"), num("train_worst_ratio", ".2f"),
                     status, str(r.get("reason") or "")[:120]))
    return table(f"{model}", ["backend", "logits max abs", "logits rel", "logits err/tol", "loss rel diff",
                              "weights max abs", "weights err/tol", "status", "reason"], rows,
                 right=["logits max abs", "logits rel", "logits err/tol", "loss rel diff", "weights max abs",
                        "weights err/tol"],
                 caption=f"logits vs the float64 numpy reference (rtol {RTOL:g}, atol {ATOL:g}; rel = max abs error / "
                         f"max |logit|); two SGD steps vs the numpy oracle: loss (rtol {LOSS_RTOL:g}), every parameter "
                         f"incl. BN statistics (rtol {WEIGHT_RTOL:g}, atol {WEIGHT_ATOL:g}); err/tol <= 1 passes")


def _configure_parity(p):
    p.add_argument("--models", help="comma-separated models, 'quick' (the conformance suite's quick training "
                   "set), 'ci' (its forward set in CI) or 'all' (default; with --workers: lenet5,resnet18)")
    p.add_argument("--backends", default="all", help="comma-separated backends or 'all' (default: those installed "
                                                     "here or with a tox env)")
    p.add_argument("--workers", type=int, default=1,
                   help="N > 1: data-parallel parity instead: N ranks on each framework's own engine take two steps "
                        "against the oracle of N workers (default models: lenet5,resnet18)")
    p.add_argument("--no-forward", action="store_true", help="skip the forward check")
    p.add_argument("--no-train", action="store_true", help="skip the training-step check")
    p.add_argument("--cases-only", action="store_true",
                   help="compute and cache the numpy oracle's cases for these models and the backends' conventions "
                        "(--backends all: every registered backend), run no backend")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1,
                   help="parity processes at once, each with --threads / JOBS threads: parity is correctness work, "
                        "whose processes may share cores (default 1)")
    p.add_argument("--timeout", type=positive_seconds, default=3600, help="seconds per model before its process is killed "
                                                              "and the row is a crash (default 3600)")
    p.add_argument("--results", help="results folder (default: $SAMENET_RESULTS or results/)")
    p.add_argument("--python", action="append", metavar="BACKEND=PATH", help="interpreter of a backend's env")


@command("parity", "Prove identity: forward and training-step parity of backends against the numpy oracle")
def cmd_parity(args) -> int:
    import pandas as pd

    from .parity import ACCEPTED, run_backend

    known = registry.names()
    overrides = _pairs(args.python, "--python")
    if args.cases_only:
        backends = known if args.backends == "all" else parse_list(args.backends, "--backends", known)
    elif args.backends == "all":
        backends = []
        for b in known:
            try:
                python_for(b, overrides)
                backends.append(b)
            except UsageError:
                console(stderr=True).print(f"note: backend {b} skipped: no env with its framework (tox -e {b})")
    else:
        backends = parse_list(args.backends, "--backends", known)
    if args.workers < 1:
        raise UsageError(f"--workers: must be positive, got {args.workers}")
    if args.jobs < 1:
        raise UsageError(f"--jobs: must be positive, got {args.jobs}")
    if args.workers > 1 and args.models is None:
        from .dp_parity import DP_MODELS

        args.models = ",".join(DP_MODELS)
    args.models = "all" if args.models is None else args.models
    if args.models.strip() == "quick":
        from .conformance import training_models

        models = training_models("quick")
    elif args.models.strip() == "ci":
        from .conformance import forward_models

        models = forward_models("ci")
    else:
        models = parse_list(args.models, "--models", None, zoo.names())
    for m in models:
        zoo.path_of(m)
    if args.cases_only:
        return _prepare_cases(backends, models, args)
    threads = args.threads or registry.default_threads()
    store = Store(args.results, "parity")
    pythons = {b: python_for(b, overrides) for b in backends}
    err = console(stderr=True)
    printing = threading.Lock()

    def on_row(row):
        with printing:
            err.print(f"{row['backend']} {row['model']}: {row['status']} {row.get('reason', '')}", markup=False)

    def run_unit(unit: tuple[str, list[str]]) -> list[dict]:
        b, group = unit
        if args.workers > 1:
            from .parity import run_data_parallel

            return run_data_parallel(b, group, pythons[b], args.workers,
                                     max(1, threads // (args.workers * args.jobs)), args.timeout, on_row)
        return run_backend(b, group, pythons[b], not args.no_forward, not args.no_train,
                           max(1, threads // args.jobs), args.timeout, on_row)

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        running = [pool.submit(run_unit, unit) for unit in parity_units(backends, models, args.jobs, args.workers)]
        for done in as_completed(running):
            for row in done.result():
                row["jobs"] = args.jobs
                store.write(row)
                rows.append(row)
    order = {(b, m): i for i, (b, m) in enumerate((b, m) for b in backends for m in models)}
    rows.sort(key=lambda r: order[(r["backend"], r["model"])])
    df = pd.DataFrame(rows)
    out = console()
    for m in models:
        out.print(parity_table(df, m))
    bad = df[~df["status"].isin(ACCEPTED) & df.get("known_gap", pd.Series(index=df.index, dtype=object)).isna()]
    summary = df["status"].value_counts().to_dict()
    out.print(f"{len(df)} rows: " + ", ".join(f"{v} {k}" for k, v in summary.items())
              + (f"; {len(bad)} not passing and not a listed known gap" if len(bad) else ""))
    return 1 if len(bad) else 0


cmd_parity.configure = _configure_parity


def parity_units(backends: list[str], models: list[str], jobs: int, workers: int = 1) -> list[tuple[str, list[str]]]:
    """The parity processes to run, ``(backend, models)`` each, costliest first.

    One process per backend saves its framework's import per model; with more jobs than
    backends, each backend's models are dealt into groups of about equal MACs, so that the
    jobs stay busy. Data-parallel proofs (``workers`` > 1) start their ranks per model anyway:
    one unit per model.
    """
    if workers > 1:
        return [(b, [m]) for b in backends for m in models]
    if jobs == 1:
        return [(b, list(models)) for b in backends]
    cost = {m: zoo.load(m).macs for m in models}
    groups_per_backend = min(len(models), max(1, -(-jobs // len(backends))))
    units = []
    for b in backends:
        groups: list[list[str]] = [[] for _ in range(groups_per_backend)]
        for m in sorted(models, key=lambda m: -cost[m]):  # largest first into the lightest group
            min(groups, key=lambda g: sum(cost[x] for x in g)).append(m)
        units += [(b, [m for m in models if m in g]) for g in groups if g]
    # Costliest first: a long unit started last would leave the other jobs idle at the end.
    return sorted(units, key=lambda u: -sum(cost[m] for m in u[1]))


def _prepare_cases(backends: list[str], models: list[str], args) -> int:
    """``parity --cases-only``: one line per case computed (or read from the cache); exit 1 if one failed."""
    from .parity import prepare_cases

    err = console(stderr=True)

    def on_case(line):
        err.print(f"{line['case']}: {line['status']} {line['wall_s']:.1f} s {line.get('reason', '')}", markup=False)

    start = time.perf_counter()
    lines = prepare_cases(backends, models, not args.no_forward, not args.no_train, args.workers, on_case)
    failed = [line for line in lines if line["status"] != "ok"]
    console().print(f"{len(lines)} cases in {time.perf_counter() - start:.0f} s"
                    + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _configure_train(p):
    from .training import SCHEDULES

    p.add_argument("--models", default="lenet5", help="comma-separated models (default lenet5)")
    p.add_argument("--backends", default="torch", help="comma-separated backends or 'all'")
    p.add_argument("--data", default="digits", help="digits, synthetic, mnist:PATH, cifar10:PATH or folder:PATH")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--time-budget", type=float, help="seconds of training per run (stops at the first step past it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--step-epochs", type=int, default=5, help="step schedule: epochs between decays")
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (initial weights and batch order)")
    p.add_argument("--target-acc", type=float, help="test accuracy whose training time is reported (e.g. 0.95)")
    p.add_argument("--log-steps", action="store_true", help="record every step's loss, not only the first epoch's")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="spec argument, e.g. classes=10")
    p.add_argument("--device", default="cpu")
    p.add_argument("--exec-mode", default=None)
    p.add_argument("--threads", type=int)
    p.add_argument("--timeout", type=positive_seconds, default=7200, help="seconds per run before it is killed")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each with --threads / JOBS threads: for accuracy and loss curves; "
                        "runs side by side share the cores, so their times are not timings (rows record jobs)")
    p.add_argument("--results", help="results folder (default: $SAMENET_RESULTS or results/)")
    p.add_argument("--python", action="append", metavar="BACKEND=PATH", help="interpreter of a backend's env")


def train_tables(df):
    """Per-run table, then per-backend agreement: accuracy spread and first-epoch loss curves."""
    import numpy as np

    runs = []
    for _, r in df.iterrows():
        if r["status"] == "ok":
            ttt = r.get("time_to_target_s")
            runs.append((r["model"], r["backend"], r["seed"], r["epochs_done"], f"{r['final_test_acc']:.4f}",
                         f"{r['best_test_acc']:.4f}", f"{r['train_loss'][-1]:.4f}", f"{r['train_time_s'][-1]:.1f}",
                         "" if ttt is None or ttt != ttt else f"{ttt:.1f}", "ok"))
        else:
            runs.append((r["model"], r["backend"], r["seed"], "", "", "", "", "", "", f"{r['status']}: {r.get('error')}"))
    first = table("training runs", ["model", "backend", "seed", "epochs", "final test acc", "best test acc",
                                    "last train loss", "train s", "s to target", "status"], runs,
                  right=["seed", "epochs", "final test acc", "best test acc", "last train loss", "train s",
                         "s to target"],
                  caption=(f"--jobs {int(df['jobs'].max())}: runs shared the cores, so train s and s to target are "
                           "not timings to compare" if "jobs" in df and df["jobs"].max() > 1 else None))
    ok = df[df["status"] == "ok"]
    rows = []
    for model, g in ok.groupby("model"):
        means = g.groupby("backend")["final_test_acc"].agg(["mean", "std", "count"])
        spread = (means["mean"].max() - means["mean"].min()) * 100 if len(means) > 1 else 0.0
        curve_gap = 0.0
        for seed, gs in g.groupby("seed"):
            curves = [np.asarray(c[0]) for c in gs["step_loss"] if c]
            n = min(len(c) for c in curves) if curves else 0
            if len(curves) > 1 and n:
                stack = np.stack([c[:n] for c in curves])
                curve_gap = max(curve_gap, float((stack.max(0) - stack.min(0)).max()))
        for backend, m in means.iterrows():
            rows.append((model, backend, int(m["count"]), f"{m['mean'] * 100:.2f}",
                         f"{(m['std'] if m['count'] > 1 else 0) * 100:.2f}", f"{spread:.2f}", f"{curve_gap:.2e}"))
    second = table("agreement across backends", ["model", "backend", "seeds", "mean test acc %", "std %",
                                                 "spread of means (pp)", "max first-epoch loss gap"], rows,
                   right=["seeds", "mean test acc %", "std %", "spread of means (pp)", "max first-epoch loss gap"],
                   caption="spread: largest minus smallest backend mean (target <= 1 pp); loss gap: largest "
                           "difference between backends' per-step training losses in epoch 1, same seed")
    return first, second


@command("train", "Train on real data in each backend: accuracy, loss curves, time to target")
def cmd_train(args) -> int:
    import json
    import subprocess
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    import pandas as pd

    from .args import parse_sets
    from .datasets import load as load_data
    from .lifetime import die_with_parent
    from .runner import child_environment
    from .training import TrainConfig

    known = registry.names()
    backends = parse_list(args.backends, "--backends", known, known)
    models = parse_list(args.models, "--models", None, zoo.names())
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got '{args.seeds}'") from None
    overrides = parse_sets(args.set)
    if args.jobs < 1:
        raise UsageError(f"--jobs: must be positive, got {args.jobs}")
    threads = max(1, (args.threads or registry.default_threads()) // args.jobs)
    pythons = {b: python_for(b, _pairs(args.python, "--python")) for b in backends}
    store = Store(args.results, "train")
    err = console(stderr=True)

    def run(config: TrainConfig, data_path: Path, folder: Path) -> dict:
        """One training run in its backend's interpreter; its row, or a crash row."""
        folder.mkdir()
        cfg, out = folder / "config.json", folder / "row.json"
        cfg.write_text(json.dumps(asdict(config)))
        env = child_environment(Cell(backend=config.backend, model=config.model, mode="train", batch=1,
                                     threads=threads))
        start = time.perf_counter()
        try:
            proc = subprocess.run([pythons[config.backend], "-m", "samenet.training", str(cfg), str(data_path),
                                   str(out)], env=env, cwd=folder, capture_output=True, text=True,
                                  timeout=args.timeout, preexec_fn=die_with_parent())
            tail = (proc.stderr or "")[-2000:]
        except subprocess.TimeoutExpired:
            tail = f"timeout after {args.timeout:.0f} s"
        row = json.loads(out.read_text()) if out.exists() else \
            {**asdict(config), "status": "crash", "error": tail.strip().splitlines()[-1] if tail else "no result"}
        # Runs side by side share the cores: their times (to target) are not timings to compare.
        row.update(wall_s=time.perf_counter() - start, data=args.data, jobs=args.jobs)
        return row

    rows = []
    with tempfile.TemporaryDirectory(prefix="samenet-train-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        running = []
        for i, model in enumerate(models):
            ir = zoo.load(model, overrides=overrides or None, check=not overrides)
            data_path = load_data(args.data, ir).save(Path(tmp) / f"data-{i}.npz")  # not by name: it may be a path
            for seed in seeds:
                for b in backends:
                    config = TrainConfig(b, model, args.data, args.epochs, args.time_budget, args.batch_size, args.lr,
                                         args.schedule, args.step_epochs, args.gamma, args.momentum,
                                         args.weight_decay, seed, args.target_acc, args.log_steps, args.device,
                                         args.exec_mode, threads, overrides)
                    running.append(pool.submit(run, config, data_path, Path(tmp) / f"run-{len(running)}"))
        for done in as_completed(running):
            row = done.result()
            store.write(row)
            rows.append(row)
            acc = f"test acc {row['final_test_acc']:.4f}" if row["status"] == "ok" else row.get("error")
            err.print(f"{row['backend']} {row['model']} seed {row['seed']}: {row['status']} {acc}", markup=False)
    rows = [f.result() for f in running]  # the order asked for
    out = console()
    for t in train_tables(pd.DataFrame(rows)):
        out.print(t)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


cmd_train.configure = _configure_train
