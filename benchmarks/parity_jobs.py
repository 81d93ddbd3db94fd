"""A correctness sweep with ``--jobs N`` against ``--jobs 1``: wall time and the same verdicts.

Each round runs ``samenet parity`` over the same cases once per jobs value, interleaved
(1, N, N, 1, ...), each into a fresh results folder; the oracle's cases are computed first
(``parity --cases-only``), so that no run pays for them. A case is one (backend, spec) row:
forward and two-step training parity. Every run must give the same statuses.

    .tox/core/bin/python benchmarks/parity_jobs.py --backends torch,paddle --models quick --jobs 2 --rounds 3

Prints the walls per round, the ratio (jobs N / jobs 1) per round and its median, and appends
the rows to results/benchmarks/parity-jobs.json.
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


def samenet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samenet", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_run(backends: str, models: str, jobs: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="samenet-jobs-bench-") as tmp:
        start = time.perf_counter()
        proc = samenet("parity", "--backends", backends, "--models", models, "--jobs", str(jobs), "--results", tmp,
                       *extra)
        wall = time.perf_counter() - start
        rows = [json.loads(p.read_text()) for p in Path(tmp, "parity").glob("*.json")]
    if not rows:
        raise SystemExit(f"--jobs {jobs}: no rows (exit {proc.returncode}): {proc.stderr[-800:]}")
    return {"jobs": jobs, "wall_s": wall, "exit": proc.returncode, "cases": len(rows),
            "statuses": {f"{r['backend']}/{r['model']}": r["status"] for r in rows},
            "load_avg_1m": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,paddle")
    p.add_argument("--models", default="quick")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--python", action="append", default=[], metavar="BACKEND=PATH")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "parity-jobs.json"))
    args = p.parse_args()
    extra = [a for x in args.python for a in ("--python", x)]
    warm = samenet("parity", "--cases-only", "--backends", args.backends, "--models", args.models)
    if warm.returncode:
        raise SystemExit(f"computing the oracle's cases failed: {warm.stderr[-800:]}")
    results = []
    for r in range(args.rounds):
        order = (1, args.jobs) if r % 2 == 0 else (args.jobs, 1)
        got = {j: one_run(args.backends, args.models, j, extra) for j in order}
        for j in order:
            results.append({"round": r + 1, **got[j]})
        ratio = got[args.jobs]["wall_s"] / got[1]["wall_s"]
        print(f"round {r + 1}: --jobs 1 {got[1]['wall_s']:.0f} s, --jobs {args.jobs} {got[args.jobs]['wall_s']:.0f} s "
              f"({got[1]['cases']} cases); ratio {ratio:.2f}", flush=True)
        if got[1]["statuses"] != got[args.jobs]["statuses"]:
            differ = {k: (v, got[args.jobs]["statuses"].get(k)) for k, v in got[1]["statuses"].items()
                      if got[args.jobs]["statuses"].get(k) != v}
            print(f"  statuses differ: {differ}", flush=True)
    by = {(x["round"], x["jobs"]): x["wall_s"] for x in results}
    ratios = [by[(r, args.jobs)] / by[(r, 1)] for r in range(1, args.rounds + 1)]
    print(f"--jobs {args.jobs} / --jobs 1 wall, median of {args.rounds} rounds: {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}; {os.cpu_count()} CPUs)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.write_text(json.dumps(old + [{"timestamp": stamp, "backends": args.backends, "models": args.models, **x}
                                     for x in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
