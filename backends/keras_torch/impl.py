"""Keras 3 on PyTorch: the tf backend's Keras model, run by PyTorch (``KERAS_BACKEND=torch``).

What a Keras user gets on PyTorch, next to the native ``torch`` backend: the same network as
Keras layers (backends/keras, the generic layers in keras.ops), executed eagerly by PyTorch.
The difference between the two backends' step times is what Keras costs over PyTorch.

    * Keras variables on torch are ``torch.nn.Parameter`` objects; the train step is
      PyTorch's own: autograd on the harness loss (torch's cross_entropy), then
      ``torch.optim.SGD`` (momentum, coupled L2 weight decay) over those parameters, so the
      update rule is the torch backend's, line for line.
    * BatchNorm is Keras' own layer (momentum 1 - m): it updates the running variance with
      the biased batch variance, hence ``bn_variance = "biased"``.
    * Exec mode ``eager`` only: Keras' torch backend runs op by op (its jit_compile is
      torch.compile, which compiles for minutes per net on 2 CPU cores).
    * Precision: fp32; amp-bf16 is Keras' mixed_bfloat16 policy; tf32 on CUDA only; fp16
      mixed precision would need loss scaling, which this backend does not implement. fp64
      (the float64 policy, verification only) for parity's rounding proof.

Keras reads KERAS_BACKEND once, at its first import: this module sets it (unless the
environment already does, as the runner's cells do) before importing Keras.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from samenet.backends.keras.backend import GenericKerasBackend  # noqa: E402
from samenet.backend import VERIFY_PRECISION, BuildConfig, storage_dtype  # noqa: E402
from samenet.errors import UnsupportedError  # noqa: E402
from samenet.graph import as_output_list  # noqa: E402


def _keras_promotes_float64(keep: bool) -> None:
    """Whether Keras' type promotion keeps float64 (verification builds) or makes it float32.

    Keras 3 maps a float64 result to float32 on every framework but TF, as JAX does without
    x64 (keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE): ops.matmul of two float64
    tensors computes in float32 (measured: Dense 4e-7 off a float64 product, BatchNormalization
    5e-7), so a float64 policy alone leaves float32 in the forward pass. The table is read at
    each call; only its float64 entry is switched, back to float32 by any other build.
    """
    from keras.src.backend.common import dtypes

    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if not isinstance(table, dict) or "float64" not in table:
        if keep:
            raise UnsupportedError(f"keras-torch backend: Keras {keras.__version__} has no float64 promotion "
                                   "table to switch; no float64 verification build")
        return
    table["float64"] = "float64" if keep else "float32"


def _logits(out):
    """Mixed-precision logits in float32; float64 (verification builds) kept."""
    return out if out.dtype == torch.float64 else out.float()


class KerasTorchBackend(GenericKerasBackend):
    """Keras 3 on PyTorch, eager (Keras' torch backend), PyTorch's autograd and SGD."""

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        if tuned:
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError:  # already set in this process
                pass
        return {
            "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_version": torch.__version__,
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
        }

    def build(self, ir, config: BuildConfig) -> None:
        config, kind, index = self.resolve_build(config)
        if kind == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError("keras-torch backend: CUDA is not available here")
        prec = config.precision
        if prec == "tf32" and kind != "cuda":
            raise UnsupportedError("keras-torch backend: tf32 exists on CUDA only")
        if kind == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            torch.backends.cudnn.allow_tf32 = prec == "tf32"
        self.device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)
        self.keras_device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self.config, self.ir = config, ir
        self.input_dtype = np.dtype(storage_dtype(prec)).type
        _keras_promotes_float64(prec == VERIFY_PRECISION)
        # same_avgpool=False: Keras 3.15's torch backend pads asymmetric "same" pooling with
        # mode "replicate", right for max pooling but counting copied edge values in an
        # average (TF and JAX exclude the pads): explicit zero pads and a divisor map instead.
        self.build_model(ir, config, self.keras_device, same_avgpool=False)
        params = [v.value for v in self.model.train_model.trainable_weights]
        opt = config.optimizer
        # An inference build makes no optimiser: the first torch.optim.SGD imports torch._dynamo (seconds).
        self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum,
                                         weight_decay=opt.weight_decay) if params and opt else None

    # weights -----------------------------------------------------------------

    def get_weights(self):
        return self.model.get_weights(lambda v: v.value.detach().cpu().numpy())

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        self.model.set_masks(masks, lambda m: torch.from_numpy(m).to(self.device))

    # steps -------------------------------------------------------------------

    def _input(self, x):
        return torch.from_numpy(self.model.to_native(np.asarray(x, dtype=self.input_dtype))).to(self.device)

    def forward(self, x, train=False):
        with torch.no_grad(), keras.device(self.keras_device):
            model = self.model.train_model if train else self.model.eval_model
            outs = as_output_list(model(self._input(x), training=train))
        return [self.model.from_native(o.detach().float().cpu().numpy()) for o in outs]

    def to_device(self, x, y):
        return self._input(x), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)

    def infer_step(self, batch):
        with torch.no_grad(), keras.device(self.keras_device):  # as Keras' own predict_step on torch
            return self.model.eval_model(batch[0], training=False)

    def _loss(self, outs, y):
        loss = F.cross_entropy(_logits(outs[0]), y)
        for o, w in zip(outs[1:], self.model.aux_weights):
            loss = loss + w * F.cross_entropy(_logits(o), y)
        return loss

    def train_step(self, batch):
        self.require_optimizer(self.config)
        x, y = batch
        with keras.device(self.keras_device):
            if self.optimizer is None:  # nothing to learn: forward (BN statistics) and loss only
                with torch.no_grad():
                    return self._loss(as_output_list(self.model.train_model(x, training=True)), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(as_output_list(self.model.train_model(x, training=True)), y)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def set_lr(self, lr: float) -> None:
        self.config = replace(self.config, optimizer=replace(self.config.optimizer, lr=lr))
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = lr

    def loss_value(self, loss) -> float:
        return float(loss.item())

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_stats(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": torch.cuda.max_memory_allocated(self.device) / mb,
                "reserved_peak_mb": torch.cuda.max_memory_reserved(self.device) / mb}
