"""Keras 3 on JAX: the tf backend's Keras model, run by JAX (``KERAS_BACKEND=jax``).

What a Keras user gets on JAX: the same network as Keras layers (backends/keras, the generic
layers in keras.ops), its steps compiled by XLA the way Keras' own JAX trainer does it: pure
functions of the variables' values through ``Model.stateless_call``, under ``jax.jit``.

    * State lives outside the Keras variables while steps run (as in Keras' JAX trainer):
      lists of arrays for the trainable and non-trainable variables (BN statistics, seed
      generator states) and the momentum buffers. get_weights writes them back first;
      set_weights reads them again.
    * The train step is one jitted function: loss (mean sparse CE + weighted aux CE, in
      float32), ``jax.value_and_grad``, then PyTorch's SGD written out (g += wd * w;
      buf = m * buf + g; w -= lr * buf). The learning rate is an argument, so set_lr does
      not recompile. Every parameter gets a gradient here (zero where unused), where
      PyTorch's SGD would skip a parameter without one.
    * BatchNorm is Keras' own layer (momentum 1 - m): biased running variance, so
      ``bn_variance = "biased"``.
    * Exec modes: ``jit`` (default; first-step time includes XLA compilation) and ``eager``
      (no jax.jit, op by op: for debugging).
    * Threads: XLA:CPU sizes its thread pool to the CPUs the process may run on; ``tuned``
      with a smaller core budget restricts the process's CPU affinity to that many CPUs
      before JAX starts its client (XLA has no thread-count flag).
    * Precision: fp32; amp-bf16 is Keras' mixed_bfloat16 policy; tf32 and fp16 mixed
      precision are not implemented here (the capabilities do not declare them).

Keras reads KERAS_BACKEND once, at its first import: this module sets it (unless the
environment already does, as the runner's cells do) before importing Keras.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from backends.keras.backend import GenericKerasBackend  # noqa: E402
from harness.backend import BuildConfig  # noqa: E402
from harness.errors import UnsupportedError  # noqa: E402
from harness.graph import as_output_list  # noqa: E402

MB = 1024 * 1024


def _cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


class KerasJaxBackend(GenericKerasBackend):
    """Keras 3 on JAX: stateless_call under jax.jit (``jit``) or op by op (``eager``)."""

    # ------------------------------------------------------------------ framework

    def _gpus(self) -> list:
        try:
            return jax.devices("gpu")
        except RuntimeError:  # no GPU platform in this jaxlib
            return []

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(len(self._gpus()))]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        # XLA:CPU has no thread-count setting: its pool is sized to the CPUs the process may
        # run on when the client starts (the first device query, below). Tuned, a budget
        # smaller than that is applied as the process's CPU affinity, before the client starts.
        pinned = None
        if tuned and hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            if threads < len(cpus):
                pinned = cpus[:threads]
                os.sched_setaffinity(0, pinned)
        return {
            "cpu_affinity_set": pinned,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_version": jax.__version__,
            "jax_default_backend": jax.default_backend(),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
        }

    def build(self, ir, config: BuildConfig) -> None:
        config, kind, index = self.resolve_build(config)
        if kind == "cuda":
            gpus = self._gpus()
            if index >= len(gpus):
                raise UnsupportedError(f"keras-jax backend: no GPU {index} (JAX sees {len(gpus)}; install jax[cuda12])")
            self.device = gpus[index]
        else:
            self.device = jax.devices("cpu")[0]
        self.config, self.ir = config, ir
        self.mode = config.exec_mode
        self.build_model(ir, config, f"gpu:{index}" if kind == "cuda" else "cpu:0")
        train_model, eval_model = self.model.train_model, self.model.eval_model
        self.tvars = list(train_model.trainable_variables)
        self.ntvars = list(train_model.non_trainable_variables)
        # The eval model uses a subset of the train model's variables (no aux heads).
        tpos = {id(v): i for i, v in enumerate(self.tvars)}
        npos = {id(v): i for i, v in enumerate(self.ntvars)}
        self.eval_index = ([tpos[id(v)] for v in eval_model.trainable_variables],
                           [npos[id(v)] for v in eval_model.non_trainable_variables])
        self.bufs = None  # momentum buffers, made at the first train step (as PyTorch's SGD)
        self._pull()
        self._last = None
        self._make_functions()

    # state -------------------------------------------------------------------

    def _pull(self) -> None:
        """Reads the state from the Keras variables."""
        self.tv = [v.value for v in self.tvars]
        self.ntv = [v.value for v in self.ntvars]

    def _push(self) -> None:
        """Writes the state back into the Keras variables."""
        for var, value in zip(self.tvars, self.tv):
            var.assign(value)
        for var, value in zip(self.ntvars, self.ntv):
            var.assign(value)

    # functions ---------------------------------------------------------------

    def _compile(self, fn, donate=()):
        return fn if self.mode == "eager" else jax.jit(fn, donate_argnums=donate)

    def _loss(self, outs, y):
        loss = _cross_entropy(outs[0], y)
        for o, w in zip(outs[1:], self.model.aux_weights):
            loss = loss + w * _cross_entropy(o, y)
        return loss

    def _make_functions(self) -> None:
        """(Re)makes the step functions (again after set_masks: masks are trace constants)."""
        train_model, eval_model = self.model.train_model, self.model.eval_model
        ti, ni = self.eval_index
        opt = self.config.optimizer

        def infer(tv, ntv, x):
            out, _ = eval_model.stateless_call([tv[i] for i in ti], [ntv[i] for i in ni], x, training=False)
            return out

        def forward_train(tv, ntv, x):
            outs, new_ntv = train_model.stateless_call(tv, ntv, x, training=True)
            return as_output_list(outs), new_ntv

        def train(tv, ntv, bufs, lr, x, y):
            def loss_fn(tv):
                outs, new_ntv = train_model.stateless_call(tv, ntv, x, training=True)
                return self._loss(as_output_list(outs), y), new_ntv

            (loss, new_ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
            new_tv, new_bufs = [], []
            for w, g, buf in zip(tv, grads, bufs):
                if opt.weight_decay:
                    g = g + opt.weight_decay * w
                buf = opt.momentum * buf + g
                new_bufs.append(buf)
                new_tv.append(w - lr.astype(w.dtype) * buf)
            return loss, new_tv, new_ntv, new_bufs

        self._infer = self._compile(infer)
        self._forward_train = self._compile(forward_train)
        self._train = self._compile(train, donate=(0, 1, 2))

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        self._push()  # non-canonical state (seed generators) is kept as it is
        super().set_weights(weights)
        self._pull()

    def get_weights(self):
        self._push()
        return self.model.get_weights(lambda v: np.asarray(v.value))

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        self.model.set_masks(masks, lambda m: jax.device_put(m, self.device))
        self._make_functions()

    # steps -------------------------------------------------------------------

    def _input(self, x):
        return jax.device_put(self.model.to_native(np.asarray(x, dtype=np.float32)), self.device)

    def forward(self, x, train=False):
        xt = self._input(x)
        if train:
            outs, self.ntv = self._forward_train(self.tv, self.ntv, xt)
        else:
            outs = [self._infer(self.tv, self.ntv, xt)]
        return [self.model.from_native(np.asarray(o, dtype=np.float32)) for o in outs]

    def to_device(self, x, y):
        return self._input(x), jax.device_put(np.asarray(y, dtype=np.int32), self.device)

    def infer_step(self, batch):
        self._last = self._infer(self.tv, self.ntv, batch[0])
        return self._last

    def train_step(self, batch):
        if self.bufs is None:
            self.bufs = [jnp.zeros_like(w) for w in self.tv]
        lr = jnp.asarray(self.config.optimizer.lr, jnp.float32)
        loss, self.tv, self.ntv, self.bufs = self._train(self.tv, self.ntv, self.bufs, lr, *batch)
        self._last = loss
        return loss

    def set_lr(self, lr: float) -> None:
        self.config = replace(self.config, optimizer=replace(self.config.optimizer, lr=lr))

    def loss_value(self, loss) -> float:
        return float(loss)

    def synchronize(self) -> None:
        if self._last is not None:
            jax.block_until_ready(self._last)

    def memory_stats(self) -> dict[str, float]:
        if self.device.platform == "cpu":
            return {}
        stats = self.device.memory_stats() or {}
        return {"alloc_peak_mb": stats.get("peak_bytes_in_use", 0) / MB,
                "alloc_current_mb": stats.get("bytes_in_use", 0) / MB}
