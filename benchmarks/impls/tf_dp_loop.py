"""The spec-built TensorFlow model in a hand-written MultiWorkerMirroredStrategy loop (DP overhead benchmark).

    python benchmarks/compare.py --backend tf --impl tf_dp_loop --model lenet5 --workers 2 --rounds 3

The model is built exactly as the runner builds it in one process (the backend's Keras 3
functional model with its TF layers and seeded weights); the data-parallel part is written by
hand as TF's "Custom training loop with MultiWorkerMirroredStrategy" tutorial does:
``tf.distribute.MultiWorkerMirroredStrategy`` (RING collectives on the CPU) from the
TF_CONFIG the launcher sets (BackendInfo.dp_env), made before anything else touches TF's
context; the model (build_for) and a ``keras.optimizers.SGD(lr, momentum)`` made and built in
``strategy.scope()``, so their variables are mirrored; each rank on its shard of the global
batch; a ``tf.function`` step that calls ``strategy.run`` of a replica step: GradientTape,
per-example sparse softmax cross-entropy averaged with ``tf.nn.compute_average_loss`` over the
GLOBAL batch (Keras 3's TF optimizer all-reduces the gradients with SUM in the replica context
inside ``apply_gradients``, so each rank's loss is its share of the global mean and the summed
gradient is the mean gradient), coupled L2 weight decay added to each gradient as
``wd / world * w`` (the SUM then makes it ``g + wd * w``, torch SGD's weight_decay), and
``optimizer.apply_gradients``. Keras' fit is not used (broken under MWMS in Keras 3,
keras-team/keras#20585). No barriers: the all-reduce in the step keeps the ranks in step.
Graph mode (tf.function) only: other exec modes are refused.

How this differs from the harness's step (what a TF user writes): the loss is
compute_average_loss over the global batch with the optimizer's SUM all-reduce, where the
backend takes the mean over its shard and all-reduces the gradients with MEAN itself;
Keras' SGD (m = momentum * m - lr * g; w += m, two assigns per variable, plus its iteration
counter) instead of the backend's fused ResourceApplyMomentum; the main output's
cross-entropy only (the backend adds weighted aux-head losses; none in lenet5 or resnet18);
no strategy.reduce of the loss (the tutorial's reduce would be one more collective per step;
the step returns the rank's local loss, as the backend's does). In fp32 the two steps agree:
with 2 ranks on lenet5, both ranks' losses after 8 steps equal the harness's bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

from samenet.backends.tf import INFO  # noqa: E402
from benchmarks.impls import build_for  # noqa: E402
from samenet.data import synthetic_batch  # noqa: E402
from samenet.graph import as_output_list  # noqa: E402


def _graph_only(config):
    if (config.exec_mode or "graph") != "graph":
        raise ValueError("tf_dp_loop: the MultiWorkerMirroredStrategy step runs as a tf.function (exec mode graph) "
                         f"only, not {config.exec_mode}")
    if config.device != "cpu":
        raise ValueError("tf_dp_loop: CPU only (RING collectives)")


def setup(cell, rendezvous):
    import keras

    impl = tf.distribute.experimental.CommunicationImplementation
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl.RING))
    world = strategy.num_replicas_in_sync
    if world != rendezvous.world or strategy.cluster_resolver.task_id != rendezvous.rank:
        raise RuntimeError(f"tf_dp_loop: joined as worker {strategy.cluster_resolver.task_id} of {world}")
    with strategy.scope():  # the backend's variables (and the optimizer's) become MirroredVariables
        b, ir = build_for(INFO, cell, _graph_only)
        model = b.model.train_model
        tvars = list(model.trainable_weights)
        opt = keras.optimizers.SGD(learning_rate=cell.lr, momentum=cell.momentum)
        opt.build(tvars)
    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    with tf.device("/CPU:0"):
        x = tf.constant(b.model.to_native(x[shard]))
        y = tf.constant(y[shard].astype("int64"))
    global_batch, decay = cell.global_batch, cell.weight_decay / world

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = as_output_list(model(x, training=True))[0]
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, tvars)
        if decay:
            grads = [None if g is None else g + decay * v for g, v in zip(grads, tvars)]
        opt.apply_gradients(zip(grads, tvars))
        return loss

    @tf.function
    def train_step(x, y):
        return strategy.experimental_local_results(strategy.run(replica_step, args=(x, y)))[0]

    last = []

    def train():
        last[:] = [train_step(x, y)]

    def sync():  # reading the loss waits for the step
        if last:
            last[0].numpy()

    return train, sync
