"""A/B benchmark: the harness's runner cell against a hand-written implementation.

Both sides run in fresh processes with the same core budget and CPU settings (the runner's
child environment), in ABBA order (A, B, then B, A, ...) for ``--rounds`` rounds so that drift
of the machine hits both and neither side always goes first. The figure is the ratio of the medians of the per-process median step
times (harness / hand-written), with the per-process medians listed so the spread shows.

    python benchmarks/compare.py --backend torch --impl torch_resnet50 --model resnet50 \\
        --mode train --batch 16 --rounds 5 --target 1.03

Results are appended to results/benchmarks/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samenet import backend as registry  # noqa: E402
from samenet.cell import Cell  # noqa: E402
from samenet.env import host_environment, machine_class  # noqa: E402
from samenet.runner import child_environment, python_for, run_cell  # noqa: E402


def run_impl(impl: str, cell: Cell, python: str, timeout: float) -> dict:
    env = child_environment(cell)
    with tempfile.TemporaryDirectory(prefix="samenet-bench-") as tmp:
        config, out = Path(tmp) / "cell.json", Path(tmp) / "row.json"
        config.write_text(json.dumps(cell.to_dict()))
        proc = subprocess.run([python, str(ROOT / "benchmarks" / "handwritten.py"), impl, str(config), str(out)],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            return {"status": "error", "error": proc.stderr[-2000:]}
        return json.loads(out.read_text())


def run_impl_data_parallel(impl: str, cell: Cell, python: str, timeout: float, barriers: bool = False) -> dict:
    """IMPL as ``cell.workers`` ranks (samenet.distributed.launch); per step the slowest rank's time.

    ``barriers``: a barrier before each timed step, as the harness's cell does (the impl's
    ``barrier()``), so that both sides are timed under one protocol.
    """
    import numpy as np

    from samenet.distributed import HOST, Rendezvous, free_ports, launch, write_json
    from samenet.measure import summarize

    info = registry.get(cell.backend)
    env = {**child_environment(cell), **({"SAMENET_BENCH_BARRIERS": "1"} if barriers else {})}
    ports = free_ports(info.data_parallel.ports)
    with tempfile.TemporaryDirectory(prefix="samenet-bench-dp-") as tmp:
        tmp = Path(tmp)
        (tmp / "cell.json").write_text(json.dumps(cell.to_dict()))
        ranks = []
        for r in range(cell.workers):
            rdv = Rendezvous(r, cell.workers, ports=ports)
            write_json(tmp / f"rdv{r}.json", rdv.to_dict())
            ranks.append(([str(ROOT / "benchmarks" / "handwritten.py"), impl, "cell.json", f"row{r}.json", "--rank",
                           f"rdv{r}.json"], info.dp_env(rdv)))
        result = launch(python, ranks, info.dp_helpers(cell.workers, HOST, ports), env, tmp, timeout)
        if result.failure:
            tail = next((o.log_tail for o in result.ranks if o.role == result.failure[0]), "")
            return {"status": "error", "error": f"{result.failure}: {tail[-1500:]}"}
        rows = [json.loads((tmp / f"row{r}.json").read_text()) for r in range(cell.workers)]
    slowest = np.max([r["samples_ns"] for r in rows], axis=0).tolist()
    return {"status": "ok", "samples_ns": slowest, "first_step_s": max(r["first_step_s"] for r in rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), **summarize(slowest)}


def check_impl(impl: str, cell: Cell, python: str, timeout: float) -> str:
    """``same``, ``different`` or ``unchecked``: handwritten.py --check, in the cell's child environment."""
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "handwritten.py"), "--check", impl, cell.model],
                          env=child_environment(cell), capture_output=True, text=True, timeout=timeout)
    print(proc.stdout, end="", flush=True)
    if proc.returncode == 2:
        why = (proc.stderr.strip().splitlines() or ["no reason given"])[-1]
        print(f"{impl}: not checked against the spec ({why})", flush=True)
    return {0: "same", 1: "different"}.get(proc.returncode, "unchecked")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True)
    p.add_argument("--impl", required=True, help="module in benchmarks/impls")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--exec-mode", default=None)
    p.add_argument("--input", default=None, metavar="CxHxW", help="input per sample (default: the spec's)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--rounds", type=int, default=5,
                   help="A,B pairs of fresh processes; this 2-core VM varies 5-10%% between processes, "
                        "so 2 rounds misjudged a 2%% target and 4 settled it")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: the core budget / workers)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel ranks (IMPL then takes setup(cell, rendezvous))")
    p.add_argument("--impl-barriers", action="store_true",
                   help="time the impl's ranks as the harness times its own: a barrier before each timed step "
                        "(needs the impl's barrier())")
    p.add_argument("--target", type=float, default=None, help="ratio the harness must not exceed")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--name", default=None, help="result file name (default: derived)")
    p.add_argument("--python", default=None, metavar="PATH",
                   help="interpreter with the backend's framework (default: samenet.runner.python_for)")
    args = p.parse_args(argv)

    options = tuple(sorted(tuple(o.split("=", 1)) for o in args.option))
    shape = tuple(int(d) for d in args.input.split("x")) if args.input else None
    args.threads = args.threads or max(1, registry.default_threads() // args.workers)
    cell = Cell(backend=args.backend, model=args.model, mode=args.mode, batch=args.batch, input=shape,
                exec_mode=args.exec_mode, options=options, threads=args.threads, warmup=args.warmup, iters=args.iters,
                workers=args.workers)
    python = python_for(args.backend, {args.backend: args.python} if args.python else None)
    if os.sep in python and not os.access(python, os.X_OK):
        p.error(f"--python: {python}: no such interpreter")
    same_function = check_impl(args.impl, cell, python, args.timeout) if args.workers == 1 else "unchecked"
    harness_medians, impl_medians = [], []
    processes = {"harness": [], "impl": []}  # per process: its step times and peak RSS, in run order
    for r in range(args.rounds):
        # ABBA: each side goes first in every other round, so drift within a round (the VM's
        # load, caches, clocks) cancels instead of always falling on the same side.
        for side in ("harness", "impl") if r % 2 == 0 else ("impl", "harness"):
            if side == "harness":
                row = run_cell(cell, python, args.timeout)
                if row["status"] != "ok":
                    print(f"harness cell failed: {row.get('error')}\n{row.get('log_tail', '')}", file=sys.stderr)
                    return 1
                harness_medians.append(row["step_median_s"])
            else:
                row = (run_impl(args.impl, cell, python, args.timeout) if args.workers == 1 else
                       run_impl_data_parallel(args.impl, cell, python, args.timeout, args.impl_barriers))
                if row["status"] != "ok":
                    print(f"{args.impl} failed: {row.get('error')}", file=sys.stderr)
                    return 1
                impl_medians.append(row["step_median_s"])
            processes[side].append({"round": r + 1, "samples_ms": [round(t / 1e6, 1) for t in row["samples_ns"]],
                                    "first_step_s": row.get("first_step_s"), "peak_rss_mb": row.get("peak_rss_mb")})
            print(f"round {r + 1} {side:8s}: median {row['step_median_s'] * 1e3:9.1f} ms "
                  f"[p10 {row['step_p10_s'] * 1e3:.1f}, p90 {row['step_p90_s'] * 1e3:.1f}] "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    h, i = statistics.median(harness_medians), statistics.median(impl_medians)
    ratio = h / i
    verdict = "" if args.target is None else (" PASS" if ratio <= args.target else " FAIL") + f" (target <= {args.target})"
    print(f"{args.backend} {args.model} {args.mode} b{args.batch} {cell.exec_mode or 'default'}: harness {h * 1e3:.1f} ms, "
          f"{args.impl} {i * 1e3:.1f} ms, ratio {ratio:.3f}{verdict}; the two nets' function: {same_function}")
    record = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "backend": args.backend,
              "impl": args.impl, "impl_function": same_function, "model": args.model, "input": args.input,
              "mode": args.mode, "batch": args.batch,
              "exec_mode": args.exec_mode, "options": dict(options), "threads": args.threads, "workers": args.workers,
              "impl_barriers": args.impl_barriers,
              "rounds": args.rounds,
              "warmup": args.warmup, "iters": args.iters, "harness_medians_s": harness_medians,
              "impl_medians_s": impl_medians, "harness_processes": processes["harness"],
              "impl_processes": processes["impl"], "ratio": ratio, "target": args.target,
              "machine_class": machine_class(), **host_environment()}
    out = ROOT / "results" / "benchmarks" / f"{args.name or f'{args.backend}-{args.impl}-{args.mode}'}.json"
    if args.workers > 1:
        print(f"workers {args.workers} x {args.threads} threads, the slowest rank's step on both sides")
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(history + [record], indent=1))
    return 0 if args.target is None or ratio <= args.target else 2


if __name__ == "__main__":
    sys.exit(main())
