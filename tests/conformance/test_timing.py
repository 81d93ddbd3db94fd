"""A timed step must contain its computation: the backend's synchronize() waits for the device.

Asynchronous frameworks (MXNet's engine, MindSpore's PyNative executor, CUDA everywhere)
return from a step before the work is done; without a real synchronisation a step time is a
dispatch time. The same network on 8x the batch runs the same ops on 8x the data: its timed
step must take clearly longer (> 2x: far below the expected 8x, far above the 1x of a
missing sync). Depth is no such test: dispatch grows with the op count (unsynchronised MXNet,
2 against 8 convs: 0.19 vs 0.54 ms, a 2.8x), batch size leaves it alone (unsynchronised
MXNet, batch 2 against 16: 0.64 vs 0.64 ms; synchronised 8.6 vs 62 ms). Both networks are
built first and timed in turn, the fastest sample of each compared, so a busy spell of a
shared CI machine slows both alike (timed one after the other, MindSpore once gave 75 ms
against 144 ms in CI). For a train step fixed costs blur any ratio on a loaded machine, so a
train step is timed again with the loss read back to the host after the sync: a working sync
leaves nothing for that read to wait for (unsynchronised MXNet: 6 ms against 488 ms). Not a
speed target: a protocol check.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from samenet.backend import BuildConfig
from samenet.init import init_weights
from samenet.ir import build_ir

DEPTH = 8
SMALL_BATCH, LARGE_BATCH = 2, 16


def conv_stack(depth: int):
    layers = []
    for i in range(depth):
        layers += [{"op": "conv2d", "name": f"conv{i}", "out_channels": 64, "kernel": 3, "pad": 1},
                   {"op": "relu", "name": f"relu{i}"}]
    layers += [{"op": "global_avgpool", "name": "pool"}, {"op": "flatten", "name": "flat"},
               {"op": "linear", "name": "fc", "out_features": 10}]
    return build_ir({"name": f"conv_stack{depth}", "input": [64, 32, 32], "layers": layers}, "timing test")


def prepared_step(backend, mode: str, batch_size: int = 16):
    """Builds the DEPTH-conv stack; returns its step, run twice already (tracing, warm-up)."""
    ir = conv_stack(DEPTH)
    backend.build(ir, BuildConfig())
    backend.set_weights(init_weights(ir, 0))
    rng = np.random.default_rng(0)
    batch = backend.to_device(rng.standard_normal((batch_size, 64, 32, 32)).astype(np.float32),
                               rng.integers(0, 10, batch_size))
    step = backend.train_step if mode == "train" else backend.infer_step
    for _ in range(2):  # first step (tracing, compilation) and a warm-up
        step(batch)
        backend.synchronize()
    return lambda: step(batch)


def timed(backend, run_step, read_loss: bool = False) -> float:
    t = time.perf_counter()
    out = run_step()
    backend.synchronize()
    if read_loss:
        backend.loss_value(out)
    return time.perf_counter() - t


def fastest_in_turn(first, second, samples: int = 5, until=None, budget_s: float = 90.0) -> tuple[float, float, int]:
    """Fastest of ``samples`` timings of each callable, taken in turn: a busy spell slows both.

    With ``until(a, b)``, more rounds of ``samples`` follow while it is false, for at most
    ``budget_s`` seconds: on a machine busy with other work, threads that wait for each other
    at every op (2 threads on 2 cores beside another test process: about 10 ms an op, for
    seconds at a time) add the same to both, and one round's fastest samples can be skewed.
    More samples cannot turn a missing sync's ratio of about 1 into one that passes. Returns
    the two fastest times and how many samples each took.
    """
    times = []
    start = time.perf_counter()
    while True:
        times += [(first(), second()) for _ in range(samples)]
        a, b = min(a for a, _ in times), min(b for _, b in times)
        if until is None or until(a, b) or time.perf_counter() - start > budget_s:
            return a, b, len(times)


def test_timed_step_includes_the_computation(new_backend, requires):
    mode = "infer"
    requires("infer")
    small_backend, large_backend = new_backend(), new_backend()
    small_step = prepared_step(small_backend, mode, SMALL_BATCH)
    large_step = prepared_step(large_backend, mode, LARGE_BATCH)
    small, large, n = fastest_in_turn(lambda: timed(small_backend, small_step), lambda: timed(large_backend, large_step),
                                      until=lambda small, large: large > 2 * small)
    assert large > 2 * small, (f"batch {LARGE_BATCH} {large * 1e3:.1f} ms vs batch {SMALL_BATCH} {small * 1e3:.1f} ms "
                               f"per {mode} step (fastest of {n}): the timed step does not wait for the computation")


def test_timed_train_step_leaves_nothing_to_wait_for(new_backend, requires):
    requires("train")
    backend = new_backend()
    train_step = prepared_step(backend, "train")
    synced, read, n = fastest_in_turn(lambda: timed(backend, train_step), lambda: timed(backend, train_step, True),
                                      until=lambda synced, read: synced > 0.5 * read)
    assert synced > 0.5 * read, (f"train step {synced * 1e3:.1f} ms synchronised, {read * 1e3:.1f} ms with the loss "
                                 f"read back (fastest of {n}): synchronize() returned before the step's work was done")
