"""Times a hand-written implementation in its own process, with the cell's protocol.

    python benchmarks/handwritten.py IMPL CONFIG.json OUT.json

IMPL names a module in benchmarks/impls with ``setup(cell) -> (step, sync)``: ``step()`` runs
one training or inference step on a batch made before timing, ``sync()`` waits for the
device. The protocol is harness.cell's: one first step, untimed warm-up, then timed steps
with perf_counter_ns read after ``sync()``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.cell import Cell  # noqa: E402
from harness.measure import peak_rss_mb, summarize  # noqa: E402


def main(impl: str, config: str, out: str) -> int:
    cell = Cell.from_dict(json.loads(Path(config).read_text()))
    step, sync = importlib.import_module(f"impls.{impl}").setup(cell)
    t0 = time.perf_counter_ns()
    step()
    sync()
    first = (time.perf_counter_ns() - t0) / 1e9
    for _ in range(cell.warmup):
        step()
        sync()
    samples = []
    for _ in range(cell.iters):
        t0 = time.perf_counter_ns()
        step()
        sync()
        samples.append(time.perf_counter_ns() - t0)
    row = {"status": "ok", "first_step_s": first, "samples_ns": samples, "peak_rss_mb": peak_rss_mb(),
           **summarize(samples)}
    Path(out).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
