"""The spec-built PyTorch model in a hand-written DistributedDataParallel loop (DP overhead benchmark).

The model is built exactly as the runner builds it in one process; the data-parallel part is
written by hand as the PyTorch DDP tutorial does: init_process_group (gloo, TCP rendezvous),
DistributedDataParallel around the module, each rank on its shard, zero_grad, forward,
cross-entropy, backward, SGD step. No barriers: the all-reduce in backward keeps the ranks in
step.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F

from samenet.backends.torch import INFO
from benchmarks.impls import build_for
from samenet.data import synthetic_batch


def setup(cell, rendezvous):
    dist.init_process_group("gloo", init_method=f"tcp://{rendezvous.host}:{rendezvous.ports[0]}",
                            rank=rendezvous.rank, world_size=rendezvous.world, timeout=datetime.timedelta(seconds=600))
    b, ir = build_for(INFO, cell)
    model = torch.nn.parallel.DistributedDataParallel(b.module)
    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    x, y = torch.from_numpy(x[shard]), torch.from_numpy(y[shard])
    opt = torch.optim.SGD(model.parameters(), lr=cell.lr, momentum=cell.momentum, weight_decay=cell.weight_decay)
    model.train()

    def train():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return train, lambda: None


def barrier():
    """For ``compare.py --impl-barriers``: the harness's barrier before each timed step."""
    dist.barrier()
