"""The numpy reference executor as a backend: a framework-free baseline.

Forward is the reference executor and training the oracle's backward pass and update rule
(samenet.grads), both in float32 (the oracle itself runs in float64). Slow, but it needs
nothing beyond numpy, which makes it the runner's test double and a floor for comparisons.
"""

from __future__ import annotations

import numpy as np

from samenet import grads, reference
from samenet.backend import Backend, BuildConfig


class NumpyBackend(Backend):
    """Forward: samenet.reference; training: samenet.grads (both float32 here).

    It has no builder table: it runs the op table's own numpy forward and backward.
    """

    def version(self) -> str:
        return np.__version__

    def build(self, ir, config: BuildConfig) -> None:
        self.ir, self.config = ir, config
        self.optimizer = config.optimizer
        self.weights = {p: np.zeros(q.shape, np.float32) for p, q in ir.params.items()}
        self.momentum: dict | None = None
        self.masks: dict | None = None
        self.steps = 0

    def set_weights(self, weights) -> None:
        self.weights = {k: np.asarray(weights[k], np.float32).copy() for k in self.ir.params}

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def param_counts(self):
        t = sum(v.size for k, v in self.weights.items() if self.ir.params[k].trainable)
        n = sum(v.size for k, v in self.weights.items() if not self.ir.params[k].trainable)
        return t, n

    def forward(self, x, train=False):
        result = reference.run(self.ir, self.weights, x, train=train, masks=self.masks, dtype=np.float32)
        return [o.astype(np.float32) for o in result.outputs]

    def set_lr(self, lr: float) -> None:
        from dataclasses import replace

        self.optimizer = replace(self.optimizer, lr=lr)

    def set_masks(self, masks) -> None:
        self.masks = dict(masks) if masks else None

    def to_device(self, x, y):
        return x, y

    def infer_step(self, batch):
        return self.forward(batch[0])

    def train_step(self, batch):
        self.require_optimizer(self.config)
        x, y = batch
        self.steps += 1
        step = grads.train_step(self.ir, self.weights, x, y, self.optimizer, self.momentum, self.masks,
                                seed=self.steps, dtype=np.float32)
        self.weights = {k: np.asarray(v, np.float32) for k, v in step.weights.items()}
        self.momentum = step.momentum
        return step.loss
