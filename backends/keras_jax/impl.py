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
    * Data parallel (``init_distributed``): ``jax.distributed.initialize`` (coordinator on
      127.0.0.1, CPU collectives gloo), and Keras' own ``keras.distribution.DataParallel``
      over the global devices gives the mesh: the step's state is replicated over it, each
      rank's shard becomes its part of one global batch (Keras' ``distribute_data_input``,
      i.e. ``jax.make_array_from_process_local_data``, with the distribution's data layout),
      and the same jitted step is one SPMD program: XLA all-reduces the gradient of the global mean
      loss (the mean of the ranks' gradients) and BatchNorm's batch statistics, so BN is
      ``sync``. The step returns the per-sample losses (sharded like the batch); a rank's
      ``loss_value`` is the mean of its own shard, the oracle's per-rank loss.

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

from samenet.backends.keras.backend import GenericKerasBackend  # noqa: E402
from samenet.backend import BuildConfig, split_device  # noqa: E402
from samenet.errors import UnsupportedError  # noqa: E402
from samenet.graph import as_output_list  # noqa: E402

MB = 1024 * 1024
DP_RANK_ENV = "SAMENET_JAX_LOCAL_RANK"
"""A data-parallel rank's index on its host, set by KerasJaxInfo.dp_env (read by configure,
before JAX starts, to pin the rank to its own CPUs)."""


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
        # smaller than that is applied as the process's CPU affinity, before the client starts;
        # a data-parallel rank r takes the r-th block of CPUs, so the ranks do not share one.
        rank = os.environ.get(DP_RANK_ENV)
        pinned = None
        if tuned and hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            if threads < len(cpus):
                start = (int(rank or 0) * threads) % len(cpus)
                pinned = (cpus + cpus)[start:start + threads]
                os.sched_setaffinity(0, pinned)
        settings = {
            "cpu_affinity_set": pinned,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_version": jax.__version__,
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
        }
        # A data-parallel rank must not start the JAX client before jax.distributed.initialize
        # (init_distributed, which reports the default backend instead).
        if rank is None:
            settings["jax_default_backend"] = jax.default_backend()
        return settings

    def build(self, ir, config: BuildConfig) -> None:
        config, kind, index = self.resolve_build(config)
        if kind == "cuda":
            gpus = self._gpus()
            if index >= len(gpus):
                raise UnsupportedError(f"keras-jax backend: no GPU {index} (JAX sees {len(gpus)}; install jax[cuda12])")
            self.device = gpus[index]
        else:
            self.device = jax.local_devices(backend="cpu")[0]
        self.config, self.ir = config, ir
        self.mode = config.exec_mode
        keras_device = f"gpu:{index}" if kind == "cuda" else "cpu:0"
        dist = getattr(self, "distribution", None)
        if dist is not None:
            if self.mode == "eager":
                raise UnsupportedError("keras-jax backend: data parallel runs the jitted step (exec mode jit)")
            # The Keras variables stay on this rank's own device; the step's state is global.
            self.device = jax.local_devices()[0]
            keras_device = f"{self.device.platform}:{self.device.id}"
        self.build_model(ir, config, keras_device)
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
        self.tv = [self._global(v.value) for v in self.tvars]
        self.ntv = [self._global(v.value) for v in self.ntvars]

    def _push(self) -> None:
        """Writes the state back into the Keras variables."""
        for var, value in zip(self.tvars, self.tv):
            var.assign(self._local(value))
        for var, value in zip(self.ntvars, self.ntv):
            var.assign(self._local(value))

    def _global(self, value):
        """Data parallel: this rank's copy of a value as a global array replicated over the
        distribution's mesh (every rank holds the same value: same weights, same seed), put
        together without a collective (Keras' own variable layout device_puts every assigned
        value to the global sharding, and JAX checks its equality across the processes with a
        collective each time: ResNet-18's set_weights 3.2 s against 0.6 s here); otherwise the
        value committed to the build's device, as the step's outputs are: jax.jit keys its
        executable on the arguments' placement too, so uncommitted first-step weights compiled
        the whole train step a second time at step 2."""
        if getattr(self, "distribution", None) is None:
            return jax.device_put(value, self.device)
        return jax.make_array_from_single_device_arrays(value.shape, self._shardings()[1],
                                                        [jax.device_put(value, self.device)])

    def _local(self, value):
        """This rank's copy of a (replicated) global array."""
        return value.addressable_data(0) if getattr(self, "distribution", None) is not None else value

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

        dp = getattr(self, "distribution", None) is not None

        def train(tv, ntv, bufs, lr, x, y):
            def loss_fn(tv):
                outs, new_ntv = train_model.stateless_call(tv, ntv, x, training=True)
                if dp:  # per-sample losses: their global mean is the loss, a shard's is a rank's
                    per = self._per_sample_loss(as_output_list(outs), y)
                    return jnp.mean(per), (per, new_ntv)
                return self._loss(as_output_list(outs), y), new_ntv

            (loss, new_ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
            if dp:
                loss, new_ntv = new_ntv
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
        if dp:  # the batch sharded over the ranks' devices, every other state replicated
            batch, replicated = self._shardings()
            self._train = jax.jit(train, donate_argnums=(0, 1, 2),
                                  out_shardings=(batch, replicated, replicated, replicated))
            self._zeros = jax.jit(lambda tv: [jnp.zeros_like(w) for w in tv], out_shardings=replicated)
        else:
            self._train = self._compile(train, donate=(0, 1, 2))
            # One program for every buffer (jnp.zeros_like op by op compiles one per shape), its
            # outputs committed to the device like the step's (else step 2 compiles the step again).
            zeros = self._compile(lambda tv: [jnp.zeros_like(w) for w in tv])
            self._zeros = lambda tv: jax.device_put(zeros(tv), self.device)

    def _shardings(self):
        """(batch-sharded, replicated) shardings over the distribution's global mesh."""
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = self.distribution.device_mesh.backend_mesh
        return NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())

    def _per_sample_loss(self, outs, y):
        def ce(logits):
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

        per = ce(outs[0])
        for o, w in zip(outs[1:], self.model.aux_weights):
            per = per + w * ce(o)
        return per

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        self._push()  # non-canonical state (seed generators) is kept as it is
        super().set_weights(weights)
        self._pull()

    def get_weights(self):
        self._push()
        return self.model.get_weights(lambda v: np.asarray(v.value))

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        if masks and getattr(self, "distribution", None) is not None:
            raise UnsupportedError("keras-jax backend: fixed dropout masks are not built for data parallel "
                                   "(they would be constants of the global batch)")
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
        if getattr(self, "distribution", None) is not None:
            # This rank's shard becomes its part of the global batch (Keras' own data input).
            from keras.src.backend.jax.distribution_lib import distribute_data_input

            x = self.model.to_native(np.asarray(x, dtype=np.float32))
            y = np.asarray(y, dtype=np.int32)
            return tuple(distribute_data_input(a, self.distribution.get_data_layout((a.shape[0] * self.world,
                                                                                      *a.shape[1:])), "batch")
                         for a in (x, y))
        return self._input(x), jax.device_put(np.asarray(y, dtype=np.int32), self.device)

    def infer_step(self, batch):
        self._last = self._infer(self.tv, self.ntv, batch[0])
        return self._last

    def train_step(self, batch):
        self.require_optimizer(self.config)
        if self.bufs is None:
            self.bufs = self._zeros(self.tv)
        lr = np.float32(self.config.optimizer.lr)
        loss, self.tv, self.ntv, self.bufs = self._train(self.tv, self.ntv, self.bufs, lr, *batch)
        self._last = loss
        return loss

    def set_lr(self, lr: float) -> None:
        self.config = replace(self.config, optimizer=replace(self.config.optimizer, lr=lr))

    def loss_value(self, loss) -> float:
        if getattr(loss, "ndim", 0):  # data parallel: this rank's shard of the per-sample losses
            return float(np.mean(np.concatenate([np.asarray(s.data, np.float64) for s in loss.addressable_shards])))
        return float(loss)

    # ------------------------------------------------------------------ data parallel

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        from keras.distribution import DataParallel

        kind, _ = split_device(rendezvous.device)
        if kind != "cpu":
            # CUDA: one GPU per rank would need local_device_ids; written only for the CPU.
            raise UnsupportedError("keras-jax backend: data parallel is built for the CPU only")
        address = f"{rendezvous.coordinator}:{rendezvous.ports[0]}"
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=rendezvous.world,
                                   process_id=rendezvous.rank, coordinator_bind_address=address,
                                   initialization_timeout=120)
        if jax.process_count() != rendezvous.world or jax.process_index() != rendezvous.rank:
            raise RuntimeError(f"keras-jax backend: joined as process {jax.process_index()} of "
                               f"{jax.process_count()}, not {rendezvous.rank} of {rendezvous.world}")
        self.rendezvous, self.world = rendezvous, rendezvous.world
        # The replicated state must be equal on every process (the seed generators' too): one
        # seed for all, what keras.distribution.initialize's initialize_rng agrees on.
        keras.utils.set_random_seed(0)
        self.distribution = DataParallel(devices=jax.devices())
        return {"transport": "gloo",
                "dp_engine": "keras.distribution.DataParallel (jax.jit SPMD)",
                "jax_default_backend": jax.default_backend(), "jax_global_devices": jax.device_count()}

    def barrier(self) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("samenet")

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        from jax.sharding import NamedSharding, PartitionSpec

        from samenet.distributed import time_collective

        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("ranks",))
        n = max(1, nbytes // 4)
        # One row per rank, summed over the ranks into a replicated result: an all-reduce.
        parts = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("ranks")),
                                                       np.ones((1, n), np.float32))
        total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))

        def allreduce():
            jax.block_until_ready(total(parts))

        return time_collective(allreduce, self.barrier, iters)

    def shutdown_distributed(self) -> None:
        if getattr(self, "rendezvous", None) is not None:
            jax.distributed.shutdown()
            self.rendezvous = None

    def synchronize(self) -> None:
        if self._last is not None:
            jax.block_until_ready(self._last)

    def memory_stats(self) -> dict[str, float]:
        if self.device.platform == "cpu":
            return {}
        stats = self.device.memory_stats() or {}
        return {"alloc_peak_mb": stats.get("peak_bytes_in_use", 0) / MB,
                "alloc_current_mb": stats.get("bytes_in_use", 0) / MB}
