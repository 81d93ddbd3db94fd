"""Accuracy and convergence: the same network, weights, data and order trained in each framework.

The parent loads the data set once (samenet.datasets) and writes it to one npz that every
backend's process reads, so the bytes are identical by construction. Each (backend, seed)
trains in its own process (``python -m samenet.training CONFIG DATA OUT``) from the canonical
initial weights of that seed (samenet.init), on batches in the seeded order of
samenet.datasets.batches, with the written SGD rule and a learning-rate schedule applied by
the harness. Per epoch it records train loss (mean over the epoch's steps), test loss, test
accuracy, learning rate and cumulative training time (evaluation excluded); per step, the
losses of the first epoch (or of every epoch with ``log_steps``). DAWNBench's metric, time to
a target test accuracy, is the training time at the end of the first epoch that reaches it.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SCHEDULES = ("constant", "step", "cosine")


@dataclass
class TrainConfig:
    """One training run."""

    backend: str
    model: str
    data: str = "digits"
    epochs: int = 10
    time_budget_s: float | None = None
    batch: int = 32
    lr: float = 0.01
    schedule: str = "constant"  # constant | step (x gamma every step_epochs) | cosine (to 0 over epochs)
    step_epochs: int = 5
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    target_acc: float | None = None
    log_steps: bool = False
    device: str = "cpu"
    exec_mode: str | None = None
    threads: int = 1
    overrides: dict = field(default_factory=dict)

    def lr_at(self, epoch: int) -> float:
        if self.schedule == "step":
            return self.lr * self.gamma ** (epoch // self.step_epochs)
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


def evaluate(b, x, y, batch: int) -> tuple[float, float]:
    """Test loss (mean cross-entropy) and accuracy, eval mode, in fixed order."""
    from .datasets import batches
    from .grads import cross_entropy

    losses, correct, n = 0.0, 0, 0
    for xb, yb in batches(x, y, batch, 0, 0, shuffle=False):
        logits = b.forward(xb)[0].astype(np.float64)
        losses += cross_entropy(logits, yb)[0] * len(yb)
        correct += int((logits.argmax(axis=1) == yb).sum())
        n += len(yb)
    return losses / n, correct / n


def run(config: TrainConfig, data_path: Path, row: dict) -> None:
    from . import backend as registry
    from . import zoo
    from .backend import BuildConfig, Optimizer
    from .datasets import Dataset, batches
    from .errors import UnsupportedError
    from .init import init_weights

    info = registry.get(config.backend)
    for needed in ("train", "set_lr"):
        if not getattr(info.capabilities, needed):
            raise UnsupportedError(f"backend {info.name}: training on data needs the {needed} capability")
    b = info.create()
    row["framework_version"] = b.version()
    row["settings"] = b.configure(config.threads, True)
    ds = Dataset.load(data_path)
    ir = zoo.load(config.model, overrides=config.overrides or None)
    opt = Optimizer(config.lr_at(0), config.momentum, config.weight_decay)
    b.build(ir, info.resolve_config(BuildConfig(config.device, "fp32", config.exec_mode, {}, opt)))
    b.set_weights(init_weights(ir, config.seed))
    row.update(spec_hash=ir.fingerprint(), epochs_done=0, epoch=[], train_loss=[], test_loss=[], test_acc=[],
               lr=[], train_time_s=[], step_loss=[])
    train_time = 0.0
    for epoch in range(config.epochs):
        lr = config.lr_at(epoch)
        b.set_lr(lr)
        losses = []
        for xb, yb in batches(ds.x_train, ds.y_train, config.batch, config.seed, epoch):
            t = time.perf_counter()
            loss = b.loss_value(b.train_step(b.to_device(xb, yb)))  # loss_value synchronises
            train_time += time.perf_counter() - t
            losses.append(loss)
            if config.time_budget_s and train_time >= config.time_budget_s:
                break
        test_loss, test_acc = evaluate(b, ds.x_test, ds.y_test, 256)
        row["epoch"].append(epoch + 1)
        row["train_loss"].append(float(np.mean(losses)))
        row["test_loss"].append(test_loss)
        row["test_acc"].append(test_acc)
        row["lr"].append(lr)
        row["train_time_s"].append(train_time)
        if epoch == 0 or config.log_steps:
            row["step_loss"].append(losses)
        row["epochs_done"] = epoch + 1
        if config.target_acc is not None and row.get("time_to_target_s") is None and test_acc >= config.target_acc:
            row["time_to_target_s"] = train_time
            row["epochs_to_target"] = epoch + 1
        if not all(np.isfinite(losses)):
            raise FloatingPointError(f"loss became {losses[-1]} in epoch {epoch + 1}")
        if config.time_budget_s and train_time >= config.time_budget_s:
            break
    row["final_test_acc"] = row["test_acc"][-1]
    row["best_test_acc"] = max(row["test_acc"])
    row["status"] = "ok"


def main(argv: list[str]) -> int:
    from .cell import classify_error

    config = TrainConfig(**json.loads(Path(argv[0]).read_text()))
    row: dict = {"status": "error", **asdict(config)}
    try:
        run(config, Path(argv[1]), row)
    except Exception as exc:  # noqa: BLE001  (a failed run is a row too)
        row["status"] = classify_error(exc)
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        row["error_detail"] = traceback.format_exc()[-3000:]
    Path(argv[2]).write_text(json.dumps(row, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
