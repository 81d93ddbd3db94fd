"""Times a hand-written implementation in its own process, with the cell's protocol.

    python benchmarks/handwritten.py IMPL CONFIG.json OUT.json
    python benchmarks/handwritten.py --check IMPL MODEL [BATCH]

IMPL names a module in benchmarks/impls with ``setup(cell) -> (step, sync)``: ``step()`` runs
one training or inference step on a batch made before timing, ``sync()`` waits for the
device. The protocol is samenet.cell's: one first step, untimed warm-up, then timed steps
with perf_counter_ns read after ``sync()``.

``--check`` proves an implementation computes the spec's function: with the canonical weights
its ``outputs(cell, x)`` (eval-mode, then train-mode logits) must match the backend's
spec-built net's (the backend: the impl's ``BACKEND``, else IMPL's first word) within the
conformance tolerance, or else lie within FP32_FACTOR times the spec-built net's own distance
from the float64 numpy reference (train-mode BatchNorm statistics of two float32 nets can
differ by more than the tolerance while both are right). Exit 0 when they match, 1 when
not, 2 when IMPL has no ``outputs`` or cannot be imported.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samenet.cell import Cell  # noqa: E402
from samenet.measure import peak_rss_mb, summarize  # noqa: E402


def check(impl: str, model: str, batch: str = "2") -> int:
    """Eval- and train-mode logits of IMPL against the backend's spec-built net, same weights and batch."""
    import numpy as np

    from samenet import backend as registry
    from samenet import reference, zoo
    from samenet.backend import BuildConfig
    from samenet.cell import weights_for
    from samenet.conformance import ATOL, FP32_FACTOR, RTOL
    from samenet.data import synthetic_batch

    try:
        module = importlib.import_module(f"impls.{impl}")
    except ImportError as e:
        print(f"handwritten.py --check: cannot import impls/{impl}.py with {sys.executable}: {e}", file=sys.stderr)
        return 2
    if not hasattr(module, "outputs"):
        print(f"handwritten.py --check: impls/{impl}.py has no outputs(cell, x): nothing to check", file=sys.stderr)
        return 2
    backend_name = getattr(module, "BACKEND", impl.split("_")[0])
    cell = Cell(backend=backend_name, model=model, mode="infer", batch=int(batch))
    ir = zoo.load(model, None)
    x, _ = synthetic_batch(ir, cell.batch, cell.seed)
    got = module.outputs(cell, x)
    info = registry.get(backend_name)
    b = info.create()
    b.configure(cell.threads, cell.cpu_settings == "tuned")
    b.build(ir, info.resolve_config(BuildConfig(cell.device, cell.precision, cell.exec_mode)))
    weights = weights_for(ir, cell.seed)
    b.set_weights(weights)
    want = [b.forward(x, train=False)[0], b.forward(x, train=True)[0]]
    weights64 = {k: v.astype(np.float64) for k, v in weights.items()}
    ok = True
    for mode, g, w in zip(("eval", "train"), got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        diff = float(np.max(np.abs(g - w)))
        same = bool(np.allclose(g, w, rtol=RTOL, atol=ATOL))
        line = f"max |diff| {diff:.3g}"
        if not same:  # two float32 nets may differ by more than the tolerance and both be right
            exact = reference.run(ir, weights64, x.astype(np.float64), train=mode == "train").outputs[0]
            impl_err, spec_err = float(np.max(np.abs(g - exact))), float(np.max(np.abs(w - exact)))
            same = impl_err <= FP32_FACTOR * spec_err
            line += f"; from the float64 reference: {impl_err:.3g}, the spec-built net {spec_err:.3g}"
        ok &= same
        print(f"{impl} vs spec {model} ({backend_name}), {mode}-mode logits {tuple(np.shape(g))}: {line} -> "
              f"{'same' if same else 'DIFFERENT'} (rtol {RTOL}, atol {ATOL}, else within {FP32_FACTOR}x the "
              f"spec-built net's float32 error)")
    return 0 if ok else 1


def main(impl: str, config: str, out: str, rank_flag: str | None = None, rendezvous: str | None = None) -> int:
    """Times IMPL; with ``--rank R RENDEZVOUS.json`` as rank R of a data-parallel group
    (``setup(cell, rendezvous)``)."""
    cell = Cell.from_dict(json.loads(Path(config).read_text()))
    module = importlib.import_module(f"impls.{impl}")
    if rank_flag == "--rank":
        from samenet.distributed import Rendezvous

        step, sync = module.setup(cell, Rendezvous.from_dict(json.loads(Path(rendezvous).read_text())))
    else:
        step, sync = module.setup(cell)
    t0 = time.perf_counter_ns()
    step()
    sync()
    first = (time.perf_counter_ns() - t0) / 1e9
    for _ in range(cell.warmup):
        step()
        sync()
    # --impl-barriers (compare.py): the harness's protocol, a barrier before each timed step.
    ranked = rank_flag == "--rank" and os.environ.get("SAMENET_BENCH_BARRIERS") == "1"
    barrier = getattr(module, "barrier", None) if ranked else None
    samples = []
    for _ in range(cell.iters):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter_ns()
        step()
        sync()
        samples.append(time.perf_counter_ns() - t0)
    row = {"status": "ok", "first_step_s": first, "samples_ns": samples, "peak_rss_mb": peak_rss_mb(),
           **summarize(samples)}
    Path(out).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not (args[:1] == ["--check"] and len(args) in (3, 4) or args[:1] != ["--check"] and len(args) in (3, 5)):
        sys.exit("usage: handwritten.py IMPL CONFIG.json OUT.json [--rank R RENDEZVOUS.json] | --check IMPL MODEL [BATCH]")
    sys.exit(check(*args[1:]) if args[0] == "--check" else main(*args))
