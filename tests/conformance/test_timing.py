"""A timed step must contain its computation: the backend's synchronize() waits for the device.

Asynchronous frameworks (MXNet's engine, MindSpore's PyNative executor, CUDA everywhere)
return from a step before the work is done; without a real synchronisation a step time is a
dispatch time, the same for any depth. A stack of 4x as many convolutions must take clearly
longer per timed step (> 2x: far below the expected 4x, far above the 1x of a missing sync,
so the test survives a loaded CI machine); measured on MXNet, unsynchronised: 0.41 vs 0.52 ms,
synchronised: 17 vs 85 ms. For a train step depth is no test: dispatch alone grows with depth
(MXNet's autograd records every op: 1 vs 6 ms unsynchronised), and fixed costs blur the ratio
on a loaded machine. So a train step is timed again with the loss read back to the host
after the sync: a working sync leaves nothing for that read to wait for (unsynchronised
MXNet: 6 ms against 488 ms). Not a speed target: a protocol check.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from harness.backend import BuildConfig
from harness.init import init_weights
from harness.ir import build_ir

SHALLOW, DEEP = 2, 8


def conv_stack(depth: int):
    layers = []
    for i in range(depth):
        layers += [{"op": "conv2d", "name": f"conv{i}", "out_channels": 64, "kernel": 3, "pad": 1},
                   {"op": "relu", "name": f"relu{i}"}]
    layers += [{"op": "global_avgpool", "name": "pool"}, {"op": "flatten", "name": "flat"},
               {"op": "linear", "name": "fc", "out_features": 10}]
    return build_ir({"name": f"conv_stack{depth}", "input": [64, 32, 32], "layers": layers}, "timing test")


def step_time(backend, depth: int, mode: str, read_loss: bool = False) -> float:
    ir = conv_stack(depth)
    backend.build(ir, BuildConfig())
    backend.set_weights(init_weights(ir, 0))
    rng = np.random.default_rng(0)
    batch = backend.to_device(rng.standard_normal((16, 64, 32, 32)).astype(np.float32), rng.integers(0, 10, 16))
    step = backend.train_step if mode == "train" else backend.infer_step
    for _ in range(2):  # first step (tracing, compilation) and a warm-up
        step(batch)
        backend.synchronize()
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        out = step(batch)
        backend.synchronize()
        if read_loss:
            backend.loss_value(out)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def test_timed_step_includes_the_computation(new_backend):
    mode = "infer"
    shallow, deep = step_time(new_backend(), SHALLOW, mode), step_time(new_backend(), DEEP, mode)
    assert deep > 2 * shallow, (f"{DEEP} convs {deep * 1e3:.1f} ms vs {SHALLOW} convs {shallow * 1e3:.1f} ms per "
                                f"{mode} step: the timed step does not wait for the computation")


def test_timed_train_step_leaves_nothing_to_wait_for(new_backend):
    synced, read = step_time(new_backend(), DEEP, "train"), step_time(new_backend(), DEEP, "train", read_loss=True)
    assert synced > 0.5 * read, (f"train step {synced * 1e3:.1f} ms synchronised, {read * 1e3:.1f} ms with the loss "
                                 "read back: synchronize() returned before the step's work was done")
