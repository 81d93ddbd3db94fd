"""The spec-built MXNet model in a hand-written dist_sync kvstore loop (DP overhead benchmark).

    python benchmarks/compare.py --backend mxnet --impl mxnet_dp_loop --model lenet5 --workers 2 --rounds 3

The model is built exactly as the runner builds it in one process (the backend's Gluon graphs,
imperative or hybridized as the cell says); the data-parallel part is written by hand as the
MXNet distributed-training tutorial does: ``mx.kv.create("dist_sync")`` (ps-lite; the
scheduler and the server are the same helper processes the harness starts,
BackendInfo.dp_helpers, and the DMLC_* variables come from dp_env), a ``gluon.Trainer("sgd",
kvstore=store)`` over the trainable parameters with the tutorial's default
``update_on_kvstore`` (True for a dist kvstore: the server sums the workers' gradients and
runs the optimizer, the workers pull the weights), each rank on its shard of the global
batch, ``autograd.record()``, the backend's train graph (its mean cross-entropy is part of
the built model), ``loss.backward()``, ``trainer.step(world)`` (rescale 1/world: the mean of
the ranks' mean gradients). No barriers: the pushes and pulls keep the ranks in step.

How this differs from the harness's step: the harness passes ``update_on_kvstore=False`` (the
server only sums; every worker runs SGD locally on the pulled sum).
"""

from __future__ import annotations

import atexit
import gc

import mxnet as mx
from mxnet import autograd, gluon

from samenet.backends.mxnet import INFO
from benchmarks.impls import build_for
from samenet.data import synthetic_batch


def setup(cell, rendezvous):
    store = mx.kv.create("dist_sync")
    if store.num_workers != rendezvous.world:
        raise RuntimeError(f"mxnet_dp_loop: kvstore has {store.num_workers} workers, not {rendezvous.world}")
    b, ir = build_for(INFO, cell)
    b.trainer = None  # the backend's single-process Trainer: unused here
    net = b.train_net
    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    x = mx.nd.array(x[shard], ctx=b.ctx, dtype=b.dtype)
    y = mx.nd.array(y[shard], ctx=b.ctx, dtype=b.dtype)
    trainer = gluon.Trainer(list(b.trainable.values()), "sgd",
                            {"learning_rate": cell.lr, "momentum": cell.momentum, "wd": cell.weight_decay},
                            kvstore=store)
    world = store.num_workers

    def train():
        with autograd.record(train_mode=True):
            loss = net(x, y)[0]
        loss.backward()
        trainer.step(world)

    def close():  # as the backend's shutdown: free the kvstore before the interpreter goes
        nonlocal trainer, store
        mx.nd.waitall()
        trainer = store = None
        gc.collect()

    atexit.register(close)
    return train, mx.nd.waitall
