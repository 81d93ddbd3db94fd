"""What a cell costs beyond its framework's import and its steps, per backend, A/B between trees.

Each round runs one fresh cell (default: lenet5, inference, batch 1) per tree and backend,
interleaved (A, B, B, A, ...), through that tree's own ``runner.run_cell``, so the wall time
is the parent's view of the whole process (start to exit), as in a sweep. Per cell:

* ``overhead_s`` = wall - import - steps, where steps = first step + warm-up + timed steps
  (the warm-up counted at the timed median);
* its parts: ``build_s``, ``weights_s`` (with moving the batch) and the rest, itself split
  (where the tree's rows say) into process start, the harness's work and exit.

    python benchmarks/cell_overhead.py --trees before=/tmp/before,after=. \\
        --backends torch,tf --python torch=.tox/torch/bin/python --rounds 3

Prints a table of medians (and min-max over the rounds) per tree and backend, and appends the
rows to results/benchmarks/cell-overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARENT = """
import json, sys
from samenet.cell import Cell
from samenet.runner import python_for, run_cell
cell = Cell.from_dict(json.loads(sys.argv[1]))
python = sys.argv[2] or python_for(cell.backend)
print("ROW " + json.dumps(run_cell(cell, python, 600.0), default=str))
"""


def one_cell(tree: Path, cell: dict, python: str) -> dict:
    """One cell run by TREE's runner (in a fresh parent, so nothing is cached between cells)."""
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("SAMENET_", "HOME"))})
    proc = subprocess.run([sys.executable, "-c", PARENT, json.dumps(cell), python], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"status": "error", "error": (proc.stderr or proc.stdout)[-500:]}


def breakdown(row: dict) -> dict:
    """The cell's wall time split into import, steps and the overhead's parts.

    Rows of trees that record ``startup_s``, ``exit_s`` and ``steps_s`` split the rest into
    process start (interpreter, harness imports), the harness's own work in the process (IR,
    weights and batch loading, the row) and exit (teardown, as the parent waits for it).
    """
    if row.get("status") != "ok":
        return {"status": row.get("status"), "error": row.get("error")}
    steps = row.get("steps_s") or (row["first_step_s"] + sum(row["samples_ns"]) / 1e9
                                   + row["warmup"] * row["step_median_s"])
    overhead = row["wall_s"] - row["import_s"] - steps
    rest = overhead - row["build_s"] - row["weights_s"] - row["to_device_s"]
    out = {"status": "ok", "wall_s": row["wall_s"], "import_s": row["import_s"], "steps_s": steps,
           "overhead_s": overhead, "build_s": row["build_s"], "weights_s": row["weights_s"] + row["to_device_s"],
           "rest_s": rest, "startup_s": None, "harness_s": None, "exit_s": None}
    if row.get("startup_s") is not None and row.get("exit_s") is not None:
        out["startup_s"], out["exit_s"] = row["startup_s"], row["exit_s"]
        out["harness_s"] = rest - out["startup_s"] - out["exit_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default=f"current={ROOT}", help="NAME=PATH,... checkouts to compare (default: this one)")
    p.add_argument("--backends", default="torch")
    p.add_argument("--python", action="append", default=[], metavar="BACKEND=PATH")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--mode", default="infer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    trees = {}
    for item in args.trees.split(","):
        name, _, path = item.partition("=")
        trees[name] = Path(path).resolve()
    pythons = dict(item.split("=", 1) for item in args.python)
    # abspath, not resolve(): a venv's python is a symlink whose target is outside the venv.
    pythons = {k: os.path.abspath(v) if "/" in v else v for k, v in pythons.items()}
    backends = args.backends.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    names = list(trees)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for backend in backends:
            for name in order:
                cell = {"backend": backend, "model": args.model, "mode": args.mode, "batch": args.batch,
                        "warmup": args.warmup, "iters": args.iters, "threads": args.threads}
                b = breakdown(one_cell(trees[name], cell, pythons.get(backend, "")))
                results.setdefault((backend, name), []).append(b)
                shown = (f"overhead {b['overhead_s']:.2f} s (wall {b['wall_s']:.2f}, import {b['import_s']:.2f}, "
                         f"build {b['build_s']:.2f}, rest {b['rest_s']:.2f})" if b["status"] == "ok"
                         else f"{b['status']}: {b.get('error')}")
                print(f"round {r + 1} {backend} {name}: {shown}", flush=True)
    keys = ("wall_s", "import_s", "steps_s", "overhead_s", "build_s", "weights_s", "rest_s", "startup_s", "harness_s",
            "exit_s")
    print(f"\n{args.model} {args.mode} b{args.batch}, {args.rounds} rounds: median (min-max) in seconds")
    print("| backend | tree | " + " | ".join(k[:-2] for k in keys) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
    for (backend, name), rows in results.items():
        ok = [b for b in rows if b["status"] == "ok"]
        if not ok:
            print(f"| {backend} | {name} | " + " | ".join("-" for _ in keys) + " |")
            continue
        cells = []
        for k in keys:
            v = [b[k] for b in ok if b[k] is not None]
            if not v:
                cells.append("-")
                continue
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        print(f"| {backend} | {name} | " + " | ".join(cells) + " |")
    out = ROOT / "results" / "benchmarks" / "cell-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
              "results": {f"{b}/{n}": rows for (b, n), rows in results.items()}}
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
