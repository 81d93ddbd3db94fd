"""What Ray's dispatch costs per cell, against the local executor, on the same cells.

Each round runs the same sweep twice, interleaved (local, ray, ray, local, ...): N lenet5
inference cells (batch 1; seeds 0..N-1, so N distinct cells) through ``runner.sweep``, once
with the local executor and once with the Ray executor on a local Ray instance (127.0.0.1
only, started and stopped per round; its start and stop are reported apart). Both run the
cells one at a time (timing cells), so per cell:

* ``per_cell_s`` = sweep wall / N, as the user sees it;
* ``outside_cell_s`` = (sweep wall - the cells' own process walls) / N: what the executor adds
  around each cell process, the part that does not drift with the cell's own run time.

Ray's dispatch overhead per cell is the ray minus local difference of each, per round.

    .tox/core/bin/python benchmarks/ray_overhead.py --backend torch --cells 20 --rounds 3

Prints a table per round and the medians, and appends the rows to
results/benchmarks/ray-overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samenet.cell import Cell  # noqa: E402
from samenet.executors import RayExecutor  # noqa: E402
from samenet.results import Store  # noqa: E402
from samenet.runner import LocalExecutor, python_for, sweep  # noqa: E402


def one_sweep(executor_name: str, cells: list[Cell], python: str) -> dict:
    """The sweep's wall time (without starting or stopping Ray) and its cells' own walls."""
    with tempfile.TemporaryDirectory(prefix="samenet-ray-bench-") as tmp:
        store = Store(tmp, "bench")
        executor = LocalExecutor() if executor_name == "local" else RayExecutor()
        start_s = 0.0
        if executor_name == "ray":
            t = time.perf_counter()
            executor._start(cells)
            start_s = time.perf_counter() - t
        t = time.perf_counter()
        rows = sweep(cells, store, lambda b: python, timeout=600, progress=False, executor=executor)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        executor.close()
        stop_s = time.perf_counter() - t
    bad = [r for r in rows if r["status"] != "ok"]
    if bad or len(rows) != len(cells):
        raise SystemExit(f"{executor_name}: {len(bad)} of {len(rows)} cells not ok: {bad[:1]}")
    cell_walls = sum(r["wall_s"] for r in rows)
    return {"executor": executor_name, "cells": len(cells), "sweep_s": wall, "cells_wall_s": cell_walls,
            "per_cell_s": wall / len(cells), "outside_cell_s": (wall - cell_walls) / len(cells),
            "ray_start_s": start_s, "ray_stop_s": stop_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--python", help="the backend's interpreter (default: its tox env)")
    p.add_argument("--cells", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "ray-overhead.json"))
    args = p.parse_args()
    python = args.python or python_for(args.backend)
    cells = [Cell(backend=args.backend, model="lenet5", mode="infer", batch=1, threads=1, seed=s, warmup=3, iters=10)
             for s in range(args.cells)]
    results = []
    for r in range(args.rounds):
        order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
        got = {name: one_sweep(name, cells, python) for name in order}
        for name in order:
            results.append({"round": r + 1, **got[name]})
        print(f"round {r + 1}: " + "; ".join(
            f"{n} {got[n]['per_cell_s']:.3f} s/cell ({got[n]['outside_cell_s']:.3f} outside the cell)" for n in order)
            + f"; ray start {got['ray']['ray_start_s']:.1f} s, stop {got['ray']['ray_stop_s']:.1f} s", flush=True)
    by = {(x["round"], x["executor"]): x for x in results}
    rounds = range(1, args.rounds + 1)
    diff = [by[(r, "ray")]["per_cell_s"] - by[(r, "local")]["per_cell_s"] for r in rounds]
    outside = [by[(r, "ray")]["outside_cell_s"] - by[(r, "local")]["outside_cell_s"] for r in rounds]
    print(f"Ray minus local, per cell, median of {args.rounds} rounds: {statistics.median(diff):+.3f} s wall "
          f"(rounds {', '.join(f'{d:+.3f}' for d in diff)}); {statistics.median(outside):+.3f} s outside the cell "
          f"process (rounds {', '.join(f'{d:+.3f}' for d in outside)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.write_text(json.dumps(old + [{"timestamp": stamp, "backend": args.backend, **x} for x in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
