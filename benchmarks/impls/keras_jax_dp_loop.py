"""The spec-built Keras model on JAX in a hand-written jax.jit SPMD data-parallel loop (DP overhead benchmark).

    python benchmarks/compare.py --backend keras-jax --impl keras_jax_dp_loop --model lenet5 --workers 2 --rounds 3

The Keras model is the backend's own build with the seeded weights (benchmarks.impls.build_for);
the data-parallel part is written by hand as Keras 3's "Multi-GPU distributed training with
JAX" guide does, over the processes of ``jax.distributed``: ``jax.distributed.initialize``
from the rendezvous (coordinator on rank 0's host, gloo CPU collectives as the backend sets),
one mesh axis ``batch`` over ``jax.devices()`` (one CPU device per rank), the model's
trainable and non-trainable variables and the optimizer's variables ``jax.device_put`` onto a
replicated NamedSharding, each rank's shard of the global batch made one batch-sharded global
array (``jax.make_array_from_process_local_data``), and one ``jax.jit`` train step (state
donated): ``model.stateless_call(..., training=True)``,
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` (plus the spec's weighted
aux heads, if any), ``jax.value_and_grad``, coupled L2 (g + wd * w), then
``keras.optimizers.SGD(lr, momentum).stateless_apply``. XLA inserts the gradient all-reduce
(and BatchNorm's global batch statistics) from the shardings: no explicit collective, no
barriers. ``sync()`` waits for the step's loss.

The build runs the backend's one-process build, with one change: the Keras variables are
made on this rank's own CPU device (the one-process build names ``cpu:0``, which after
``jax.distributed.initialize`` is rank 0's device, not addressable from another rank). The
rank's CPU pinning is the backend's ``configure`` (build_for calls it; the JAX client starts
after it, at the build). Exec mode ``jit`` only.

How this differs from the harness's step: Keras' loss object and Keras' SGD through
``stateless_apply`` (m = mu * m - lr * g; w += m, with its iteration counter; the same
update for a constant learning rate as the backend's written-out PyTorch rule buf = mu * buf
+ g; w -= lr * buf) instead of jax.numpy; the learning rate lives in the optimizer's state
(the backend passes it as an argument); the step returns the global mean loss (the backend
returns the per-sample losses, sharded like the batch); the output shardings are left to XLA
(the backend fixes them); no barrier before a timed step (the runner's cell has one).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from samenet.backends.keras_jax import KerasJaxInfo  # noqa: E402
from samenet.backends.keras_jax.impl import KerasJaxBackend  # noqa: E402
from benchmarks.impls import build_for  # noqa: E402
from samenet.data import synthetic_batch  # noqa: E402
from samenet.graph import as_output_list  # noqa: E402

BACKEND = "keras-jax"


class _RankBackend(KerasJaxBackend):
    """The backend's one-process build, its Keras variables on this rank's own device."""

    def build_model(self, ir, config, keras_device, **builder_options):
        local = jax.local_devices()[0]
        super().build_model(ir, config, f"{local.platform}:{local.id}", **builder_options)


class _RankInfo(KerasJaxInfo):
    def load(self):
        return _RankBackend


def _jit_only(config):
    if (config.exec_mode or "jit") != "jit":
        raise ValueError(f"keras_jax_dp_loop: exec mode {config.exec_mode} not written (the data-parallel "
                         "step is one jax.jit SPMD program: jit only)")


def setup(cell, rendezvous):
    if cell.device != "cpu":
        raise ValueError("keras_jax_dp_loop: written for the CPU (gloo collectives) only")
    address = f"{rendezvous.coordinator}:{rendezvous.ports[0]}"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=rendezvous.world,
                               process_id=rendezvous.rank, initialization_timeout=120)
    keras.utils.set_random_seed(0)  # the seed generators' states: the same on every rank
    b, ir = build_for(_RankInfo(), cell, _jit_only)
    model = b.model.train_model
    aux_weights = list(b.model.aux_weights)

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    data_sharding = NamedSharding(mesh, PartitionSpec("batch"))

    optimizer = keras.optimizers.SGD(learning_rate=cell.lr, momentum=cell.momentum)
    optimizer.build(model.trainable_variables)
    state = jax.device_put(([np.asarray(v.value) for v in model.trainable_variables],
                            [np.asarray(v.value) for v in model.non_trainable_variables],
                            [np.asarray(v.value) for v in optimizer.variables]), replicated)

    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    x = jax.make_array_from_process_local_data(data_sharding, b.model.to_native(np.asarray(x[shard], np.float32)))
    y = jax.make_array_from_process_local_data(data_sharding, np.asarray(y[shard], np.int32))
    b.tv = b.ntv = None  # the backend's own copy of the state: unused here

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    wd = cell.weight_decay

    def compute_loss(trainable, non_trainable, x, y):
        outs, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        outs = as_output_list(outs)
        loss = loss_fn(y, outs[0])
        for o, w in zip(outs[1:], aux_weights):
            loss = loss + w * loss_fn(y, o)
        return loss, non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def train_step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        if wd:
            grads = [g + wd * w for g, w in zip(grads, trainable)]
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    train_step = jax.jit(train_step, donate_argnums=0)
    last = None

    def train():
        nonlocal state, last
        last, state = train_step(state, x, y)

    def sync():
        if last is not None:
            jax.block_until_ready(last)

    return train, sync
