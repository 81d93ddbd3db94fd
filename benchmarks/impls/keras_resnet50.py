"""Keras' own ResNet-50 (keras.applications.ResNet50), trained and inferred as Keras users do.

Compare with the spec ``resnet50_keras`` (keras.applications' ResNet50 is v1: the stride on
the first 1x1 conv of a block, biases on every conv, BN eps 1.001e-5); the parameter count
is checked against the spec's (trainable + non-trainable, 25,636,712 at 3x224x224):

    python benchmarks/compare.py --backend tf --impl keras_resnet50 --model resnet50_keras \\
        --mode train --batch 16 --rounds 3 --target 1.05 --python /tmp/venvs/tf/bin/python

Matched to the tf backend's default execution mode ``graph``: the train and the inference
step are each one ``tf.function`` without ``jit_compile`` (``--exec-mode xla`` sets
jit_compile=True, ``--exec-mode eager`` calls the Python functions directly, as the backend
does). Data: samenet.data.synthetic_batch, transposed once to NHWC (the backend's default
layout, channels_last), int64 labels, both on the device before timing.

Train step: GradientTape over ``model(x, training=True)``, mean sparse softmax cross-entropy
from logits (keras.losses.SparseCategoricalCrossentropy(from_logits=True); the model is made
with classifier_activation=None, as the spec, so the output is logits), then
``keras.optimizers.SGD(lr, momentum, weight_decay).apply_gradients``. Inference:
``model(x, training=False)`` in a tf.function. sync: ``.numpy()`` of the last result, as the
backend's synchronize() (graph results on the CPU are materialised by reading them).

How this differs from the harness backend (on purpose: it is what a Keras user gets):
    * Optimizer: Keras' SGD. Its weight decay is decoupled (w -= lr * wd * w, applied before
      the update and not through the momentum) and its momentum form is
      m = mu * m - lr * g; w += m. The backend adds wd * w to the gradient and applies
      PyTorch's rule with TF's fused ResourceApplyMomentum. Same cost order (a few
      element-wise ops per variable), different numbers.
    * BatchNorm: Keras 3's own BatchNormalization (its unfused path on TF); the backend calls
      FusedBatchNormV3 to get the IR's running-variance rule.
    * Weights: Keras' initializers, not the harness's canonical weights (no effect on speed).
"""

from __future__ import annotations

import os

import numpy as np

from samenet import zoo
from samenet.data import synthetic_batch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def setup(cell):
    if cell.cpu_settings == "tuned":  # as the backend's configure(): intra = budget, inter = 1
        tf.config.threading.set_intra_op_parallelism_threads(cell.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    mode = cell.exec_mode or "graph"
    if mode not in ("graph", "xla", "eager"):
        raise ValueError(f"keras_resnet50: exec mode {mode} not written")
    device = "/CPU:0" if cell.device == "cpu" else f"/GPU:{cell.device.partition(':')[2] or 0}"

    ir = zoo.load(cell.model, cell.input)
    c, h, w = ir.input_shape
    keras.utils.set_random_seed(cell.seed)
    with tf.device(device):
        model = keras.applications.ResNet50(weights=None, classes=1000, input_shape=(h, w, c),
                                            classifier_activation=None)
    spec_ir = zoo.load("resnet50_keras", cell.input)
    spec_params = spec_ir.trainable_params + spec_ir.non_trainable_params
    print(f"keras ResNet50: {model.count_params():,} parameters; spec resnet50_keras: {spec_params:,}", flush=True)
    assert model.count_params() == spec_params, (model.count_params(), spec_params)

    x, y = synthetic_batch(ir, cell.batch, cell.seed)
    with tf.device(device):
        x = tf.identity(tf.constant(np.ascontiguousarray(x.transpose(0, 2, 3, 1))))
        y = tf.identity(tf.constant(y))
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        optimizer = keras.optimizers.SGD(learning_rate=cell.lr, momentum=cell.momentum,
                                         weight_decay=cell.weight_decay or None)
        optimizer.build(model.trainable_variables)

    def train(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def infer(x):
        return model(x, training=False)

    def compile_(fn):
        if mode == "eager":
            return fn
        return tf.function(fn, jit_compile=mode == "xla")

    train_fn, infer_fn = compile_(train), compile_(infer)
    last = [None]

    def train_step():
        with tf.device(device):
            last[0] = train_fn(x, y)

    def infer_step():
        with tf.device(device):
            last[0] = infer_fn(x)

    def sync():
        if cell.device != "cpu" and hasattr(tf.test.experimental, "sync_devices"):
            tf.test.experimental.sync_devices()
        elif last[0] is not None:
            last[0].numpy()

    return (train_step if cell.mode == "train" else infer_step), sync


BACKEND = "tf"  # the harness backend that builds the spec this impl is checked against
_OUTSIDE_BLOCKS = {"conv1_conv": "conv1", "conv1_bn": "bn1", "predictions": "fc"}


def _spec_prefix(layer_name: str) -> str:
    """The spec's layer prefix for a keras.applications ResNet50 layer name."""
    if layer_name in _OUTSIDE_BLOCKS:
        return _OUTSIDE_BLOCKS[layer_name]
    stage, block, index, kind = layer_name.split("_")  # e.g. conv2_block1_0_conv
    where = f"layer{int(stage[4:]) - 1}.{int(block[5:]) - 1}"
    if index == "0":
        return f"{where}.downsample.{0 if kind == 'conv' else 1}"
    return f"{where}.{kind}{index}"


def outputs(cell, x):
    """Eval-mode, then train-mode logits on ``x`` (NCHW) with the spec's canonical weights, as numpy.

    For ``handwritten.py --check``: layers matched by name (conv{stage}_block{b}_{i}_conv/bn;
    index 0 is the shortcut), kernels transposed from the spec's OIHW / (out, in)."""
    from samenet.cell import weights_for

    ir = zoo.load("resnet50_keras", cell.input)
    c, h, w = ir.input_shape
    weights = weights_for(ir, cell.seed)
    model = keras.applications.ResNet50(weights=None, classes=1000, input_shape=(h, w, c),
                                        classifier_activation=None)
    loaded = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _spec_prefix(layer.name)
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [weights[f"{prefix}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, keras.layers.Conv2D):
            values = [weights[f"{prefix}.weight"].transpose(2, 3, 1, 0), weights[f"{prefix}.bias"]]
        else:
            values = [weights[f"{prefix}.weight"].T, weights[f"{prefix}.bias"]]
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
        loaded += len(values)
    assert loaded == len(weights), (loaded, len(weights))
    nhwc = tf.constant(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    return [model(nhwc, training=False).numpy(), model(nhwc, training=True).numpy()]
