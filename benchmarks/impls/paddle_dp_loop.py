"""The spec-built Paddle model in a hand-written paddle.DataParallel loop (DP overhead benchmark).

    python benchmarks/compare.py --backend paddle --impl paddle_dp_loop --model lenet5 --workers 2 --rounds 3

The model is built exactly as the runner builds it in one process (dynamic graph); the
data-parallel part is written by hand as Paddle's data-parallel tutorial does:
``paddle.distributed.init_parallel_env()`` (gloo on the CPU, from the PADDLE_* variables the
launcher sets: BackendInfo.dp_env), ``paddle.DataParallel(model)``, each rank on its shard of
the global batch, forward, ``F.cross_entropy``, ``loss.backward()`` (DataParallel's reducer
all-reduces the gradients), ``opt.step()``, ``opt.clear_grad()`` with
paddle.optimizer.Momentum(lr, momentum, L2Decay(wd)) over the trainable parameters. No
barriers: the all-reduce in backward keeps the ranks in step.

How this differs from the harness's step (what a Paddle user writes): F.cross_entropy
instead of the backend's shifted logsumexp; clear_grad() with Paddle's default
set_to_zero=True (the backend drops the gradients); the backend's BN stand-ins (buffers of
scale- or center-free BN layers) are cleared as the backend does, since they belong to the
built model.
"""

from __future__ import annotations

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from samenet.backends.paddle import INFO
from benchmarks.impls import build_for
from samenet.data import synthetic_batch
from samenet.graph import as_output_list


def _dynamic_only(config):
    if (config.exec_mode or "dynamic") != "dynamic":
        raise ValueError("paddle_dp_loop: paddle.DataParallel runs in the dynamic graph only")


def setup(cell, rendezvous):
    place = "cpu" if cell.device == "cpu" else f"gpu:{rendezvous.rank}"
    paddle.set_device(place)
    dist.init_parallel_env()
    if dist.get_world_size() != rendezvous.world or dist.get_rank() != rendezvous.rank:
        raise RuntimeError(f"paddle_dp_loop: joined as rank {dist.get_rank()} of {dist.get_world_size()}")
    b, ir = build_for(INFO, cell, _dynamic_only)
    module = b.module
    model = paddle.DataParallel(module)
    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    x = paddle.to_tensor(x[shard], place=place)
    y = paddle.to_tensor(y[shard].astype("int64"), place=place)
    params = [p for p in module.parameters() if not p.stop_gradient]
    opt = paddle.optimizer.Momentum(learning_rate=cell.lr, momentum=cell.momentum, parameters=params,
                                    weight_decay=paddle.regularizer.L2Decay(cell.weight_decay)
                                    if cell.weight_decay else None)
    standins = list(module.standins)
    model.train()

    def train():
        loss = F.cross_entropy(as_output_list(model(x))[0], y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        for t in standins:
            t.clear_gradient(False)

    def sync():
        if place != "cpu":
            paddle.device.synchronize(place)

    return train, sync
