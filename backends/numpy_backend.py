"""The numpy reference executor as a backend: a framework-free baseline for the runner.

It runs the reference in float32 (the oracle itself uses float64). Training needs a
backward pass, which the reference does not have: train steps are unsupported.
"""

from __future__ import annotations

import numpy as np

from harness import reference
from harness.backend import Backend, BuildConfig, split_device
from harness.errors import UnsupportedError


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"
    distribution = "numpy"
    exec_modes = ("eager",)
    known_gaps = {"train:*": "the numpy reference has no backward pass"}

    def import_framework(self) -> None:
        pass

    def version(self) -> str:
        return np.__version__

    def build(self, ir, config: BuildConfig) -> None:
        if split_device(config.device)[0] != "cpu":
            raise UnsupportedError("numpy runs on the CPU only")
        if config.precision != "fp32":
            raise UnsupportedError(f"numpy backend: precision {config.precision} not supported")
        self.ir = ir
        self.weights = {p: np.zeros(q.shape, np.float32) for p, q in ir.params.items()}

    def set_weights(self, weights) -> None:
        self.weights = {k: np.asarray(weights[k], np.float32).copy() for k in self.ir.params}

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def param_counts(self):
        t = sum(v.size for k, v in self.weights.items() if self.ir.params[k].trainable)
        n = sum(v.size for k, v in self.weights.items() if not self.ir.params[k].trainable)
        return t, n

    def forward(self, x, train=False):
        if train:
            raise UnsupportedError("numpy backend: train mode needs a backward pass")
        return [o.astype(np.float32) for o in reference.run(self.ir, self.weights, x, dtype=np.float32).outputs]

    def to_device(self, x, y):
        return x, y

    def infer_step(self, batch):
        return self.forward(batch[0])

    def train_step(self, batch):
        raise UnsupportedError("numpy backend: no train step (no backward pass)")
