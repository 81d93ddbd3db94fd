"""The spec-built PyTorch model, driven by a plain hand-written loop (harness overhead benchmark).

The model is built exactly as the runner builds it; only the step loop is written by hand:
zero_grad, forward, cross-entropy, backward, SGD step, as any PyTorch user would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samenet.backends.torch import INFO
from benchmarks.impls import build_for
from samenet.data import synthetic_batch


def setup(cell):
    b, ir = build_for(INFO, cell)
    model = b.model
    x, y = synthetic_batch(ir, cell.batch, cell.seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=cell.lr, momentum=cell.momentum, weight_decay=cell.weight_decay)

    def train():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer():
        with torch.inference_mode():
            model(x)

    if cell.mode == "train":
        model.train()
        return train, lambda: None
    model.eval()
    return infer, lambda: None
