"""TensorFlow / Keras 3 backend: the IR as a Keras functional model, tf.function, XLA or eager.

The model is backends/keras_builder.py's, shared with the keras-torch and keras-jax backends
(its docstring has the layouts, padding and weight conventions). This module replaces a few of
its layers with TensorFlow kernels and runs the steps in TensorFlow:
    * BatchNorm is a keras.layers.BatchNormalization (same variables, names and counts) whose
      call runs TF's fused kernel, FusedBatchNormV3, with ``exponential_avg_factor`` = the
      IR's (PyTorch-sense) momentum: that kernel updates running = (1 - m) * running +
      m * batch with the *unbiased* batch variance and normalises with the biased one, which
      is exactly the IR's rule, so ``bn_variance = "unbiased"``. The Keras momentum is set to
      1 - m for the record. (Keras 3's own BN call is unfused and updates with the biased
      variance.) eps is passed to the raw op as is (tf.nn.fused_batch_norm would raise it to
      1.001e-5).
    * Conv2D and DepthwiseConv2D add their bias with tf.nn.bias_add in the layer's own data
      format (see Conv2D below).
    * LRN: tf.nn.local_response_normalization (depth_radius = (n - 1) / 2, alpha as is) for
      odd n in NHWC; even n or NCHW use the builder's exact window sum.
    * The train step is one function (tf.function, optionally jit_compile) that runs the
      forward with GradientTape, the loss of harness.backend's contract (mean sparse CE +
      weighted aux CE), adds L2 weight decay to each gradient and applies PyTorch's momentum
      rule with TF's fused ResourceApplyMomentum (accum = m * accum + g; w -= lr * accum).
      Keras optimizers are not used: their weight_decay is decoupled and their momentum
      form differs in rounding.
    * Layout channels_first runs wherever TF has NCHW kernels. On this CPU build (oneDNN)
      conv, depthwise, pooling and fused BN accept NCHW in graph and XLA mode; in eager
      mode the CPU MaxPoolGrad kernel is NHWC-only, so an eager NCHW train step of a net
      with max pooling raises UnsupportedError. Nothing is silently transposed by this
      module (Keras itself transposes NCHW pooling on TF, which is why pooling here calls
      tf.nn directly in channels_first).
    * TensorFlow convolutions cannot combine stride > 1 with dilation > 1 (UnsupportedError).
"""

from __future__ import annotations

from dataclasses import replace

import gc
import os
from typing import Any

import numpy as np

from backends import keras_builder
from backends.keras_builder import POLICIES, KerasModel, Namespace
from harness.backend import Backend, BuildConfig, split_device
from harness.errors import UnsupportedError

tf = None
keras = None

MB = 1024 * 1024
_L: Namespace | None = None  # the builder's layer classes with this module's TF kernels


def _import():
    global tf, keras
    if tf is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras_builder.import_keras("tensorflow", "tf")
    import tensorflow as _tf
    import keras as _keras

    tf, keras = _tf, _keras
    _define_layers()


# --------------------------------------------------------------------------- TF layers


def _define_layers():
    """The builder's generic layers, with TF kernels where they are faster or exact."""
    global _L
    if _L is not None:
        return
    generic = keras_builder.generic_layers()

    class BatchNorm(generic.BatchNorm):
        """Keras BN (same variables and counts) running TF's fused kernel with the IR's rule."""

        def call(self, inputs, training=None, mask=None):
            x = inputs
            flat = len(x.shape) == 2
            c = x.shape[-1] if (flat or self.axis in (-1, 3)) else x.shape[1]
            if flat:
                x = tf.reshape(x, (-1, 1, 1, c))
            fmt = "NHWC" if flat or self.axis in (-1, 3) else "NCHW"
            if x.dtype == tf.float64:  # no fused kernel for doubles (verification runs only)
                y = self._call_unfused(x, training)
                return tf.reshape(y, (-1, c)) if flat else y
            scale = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((c,), tf.float32)
            offset = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((c,), tf.float32)
            mean = tf.convert_to_tensor(self.moving_mean)
            var = tf.convert_to_tensor(self.moving_variance)
            if training and self.trainable:
                y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=scale, offset=offset, mean=mean, variance=var, epsilon=self.epsilon,
                    exponential_avg_factor=self.torch_momentum, data_format=fmt, is_training=True)
                self.moving_mean.assign(new_mean)
                self.moving_variance.assign(new_var)
            else:
                y = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=mean, variance=var,
                                                epsilon=self.epsilon, data_format=fmt, is_training=False)[0]
            if flat:
                y = tf.reshape(y, (-1, c))
            return tf.cast(y, self.compute_dtype)

        def _call_unfused(self, x, training):
            axes = [0, 1, 2] if (len(x.shape) == 2 or self.axis in (-1, 3)) else [0, 2, 3]
            shape = [1, 1, 1, -1] if axes == [0, 1, 2] else [1, -1, 1, 1]
            if training and self.trainable:
                mean, var = tf.nn.moments(x, axes)
                n = tf.cast(tf.size(x) // tf.size(mean), x.dtype)
                m = self.torch_momentum
                self.moving_mean.assign((1 - m) * self.moving_mean + m * mean)
                self.moving_variance.assign((1 - m) * self.moving_variance + m * var * n / tf.maximum(n - 1, 1))
            else:
                mean, var = tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance)
            y = (x - tf.reshape(mean, shape)) / tf.sqrt(tf.reshape(var, shape) + self.epsilon)
            if self.scale:
                y = y * tf.reshape(self.gamma, shape)
            if self.center:
                y = y + tf.reshape(self.beta, shape)
            return y

    class Conv2D(keras.layers.Conv2D):
        """Keras Conv2D with the bias added by tf.nn.bias_add in the layer's own data format.

        keras.ops.add (Keras 3.15) turns "x + bias" into BiasAdd and guesses the channel axis
        from the shapes: channels_first with W == filters gets the bias added along W.
        """

        def call(self, inputs):
            y = self.convolution_op(inputs, self.kernel)
            if self.use_bias:
                y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
            return y

    class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
        """Keras DepthwiseConv2D, bias added as in Conv2D above."""

        def call(self, inputs):
            y = keras.ops.depthwise_conv(inputs, self.kernel, strides=self.strides, padding=self.padding,
                                         dilation_rate=self.dilation_rate, data_format=self.data_format)
            if self.use_bias:
                y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
            return y

    class Pool(generic.Pool):
        """tf.nn max/avg pooling, valid or same, in either layout (Keras' own pooling layers
        transpose NCHW on TF; used only for channels_first), then an optional constant
        factor map (average pooling divisor correction)."""

        def call(self, x):
            f = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
            y = f(x, self.kernel, self.stride, self.padding, data_format="NHWC" if self.channels_last else "NCHW")
            if self.factor is not None:
                y = y * tf.constant(self.factor, y.dtype)
            return y

    class LRN(generic.LRN):
        """TF's LRN kernel where it is the same formula (odd n, NHWC, float32)."""

        def call(self, x):
            n = self.size
            if self.channels_last and n % 2 == 1 and x.dtype == tf.float32:
                return tf.nn.local_response_normalization(x, depth_radius=(n - 1) // 2, bias=self.k,
                                                          alpha=self.alpha, beta=self.beta)
            return self.window_lrn(x)

    _L = generic.with_overrides(BatchNorm, Conv2D, DepthwiseConv2D, Pool, LRN)


# --------------------------------------------------------------------------- backend


class KerasTFBackend(Backend):
    """TensorFlow 2 + Keras 3 (``graph`` = tf.function, ``xla`` = jit_compile, ``eager``)."""

    name = "tf"
    framework = "tensorflow"
    distribution = "tensorflow-cpu"
    exec_modes = ("graph", "xla", "eager")
    options = {"layout": ("channels_last", "channels_first")}
    known_gaps: dict[str, str] = {}
    bn_variance = "unbiased"
    verifies_fp64 = True
    DISTRIBUTIONS = ("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tensorflow-macos", "tf-nightly",
                     "tf-nightly-cpu")

    # ------------------------------------------------------------------ no framework

    @classmethod
    def installed_version(cls) -> str | None:
        from importlib import metadata

        for dist in cls.DISTRIBUTIONS:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        """Quiet logs and Keras on TF always; tuned: Intel/TF CPU guidance for the budget.

        TF's x86 wheels use oneDNN on an Eigen thread pool: TF_ENABLE_ONEDNN_OPTS=1 (the
        default on Linux x86 since 2.9, made explicit), intra-op threads = the core budget,
        inter-op threads = 1 (one socket: independent ops would only compete for the same
        cores). The OpenMP variables cover oneDNN builds that use OpenMP.
        """
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
        if tuned:
            n = str(threads)
            env.update(super().env_vars(threads, tuned))
            env.update({"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": n,
                        "TF_NUM_INTEROP_THREADS": str(cls._inter_threads(threads))})
        return env

    @staticmethod
    def _inter_threads(threads: int) -> int:
        return 1

    # ------------------------------------------------------------------ framework

    def import_framework(self) -> None:
        _import()

    def version(self) -> str:
        return tf.__version__

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        applied = True
        if tuned:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._inter_threads(threads))
            except RuntimeError:  # the TF context already exists: settings are fixed now
                applied = False
        growth = []
        for gpu in tf.config.list_physical_devices("GPU"):
            try:  # allocate as needed, so process memory figures mean something
                tf.config.experimental.set_memory_growth(gpu, True)
                growth.append(True)
            except RuntimeError:
                growth.append(tf.config.experimental.get_memory_growth(gpu))
        return {
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "threads_applied": applied,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for Linux x86)"),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "gpu_memory_growth": growth,
        }

    def build(self, ir, config: BuildConfig) -> None:
        # Keras functional graphs are reference cycles (layers <-> nodes); a model dropped by
        # an earlier backend instance in this process is only freed by a collection, which
        # the allocation-count heuristic of the gc may not run for a long time.
        gc.collect()
        config = self.resolve_config(config)
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError("tf backend: Ascend devices are not supported")
        gpus = tf.config.list_physical_devices("GPU")
        if kind == "cuda":
            if not gpus:
                raise UnsupportedError("tf backend: TensorFlow sees no GPU here (tensorflow-cpu build, or no CUDA "
                                       "driver); install tensorflow[and-cuda] on a GPU machine")
            if index >= len(gpus):
                raise UnsupportedError(f"tf backend: no GPU {index} (TensorFlow sees {len(gpus)})")
        self.device = "/CPU:0" if kind == "cpu" else f"/GPU:{index}"
        self.gpu = kind == "cuda"
        self.gpu_name = f"GPU:{index}"
        prec = config.precision
        if prec == "tf32" and not self.gpu:
            raise UnsupportedError("tf backend: tf32 exists on CUDA only")
        if prec == "amp-fp16" and not self.gpu:
            raise UnsupportedError("tf backend: fp16 mixed precision is a GPU mode; use amp-bf16 on the CPU")
        if self.gpu:  # TF enables TF32 by default on Ampere+; fp32 means true fp32
            tf.config.experimental.enable_tensor_float_32_execution(prec == "tf32")
        policy = POLICIES[prec]
        self.loss_dtype = tf.float64 if policy == "float64" else tf.float32
        self.config, self.ir = config, ir
        self.mode = config.exec_mode
        self.channels_last = config.options.get("layout", "channels_last") == "channels_last"
        self.train_unsupported = None
        if (not self.channels_last and not self.gpu and self.mode == "eager"
                and any(n.op == "maxpool2d" for n in ir.nodes)):
            self.train_unsupported = ("tf backend: channels_first train step in eager mode on the CPU: TF's eager CPU "
                                      "MaxPoolGrad kernel supports NHWC only (use exec mode graph or xla)")
        with tf.device(self.device):
            self.model = KerasModel(ir, self.channels_last, policy, _L, "tf", strided_dilation=False)
        self.tvars = list(self.model.train_model.trainable_weights)
        self.momentum_bufs = None  # made at the first train step (PyTorch's SGD makes them lazily too)
        self.loss_scale = None
        if prec == "amp-fp16":
            with tf.device(self.device):
                self.loss_scale = tf.Variable(2.0 ** 15, trainable=False)
                self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._last = None
        self._make_functions()

    # functions ----------------------------------------------------------------

    def _compile(self, fn, signature):
        if self.mode == "eager":
            return fn
        return tf.function(fn, input_signature=signature, jit_compile=self.mode == "xla", reduce_retracing=True)

    def _make_functions(self):
        """(Re)traces the step functions (again after set_masks: masks are constants)."""
        xspec = tf.TensorSpec((None, *self.model.native_shape(self.ir.input_shape)), tf.float32)
        yspec = tf.TensorSpec((None,), tf.int64)
        device = self.device

        def infer(x):
            with tf.device(device):
                return self.model.eval_model(x, training=False)

        def forward_train(x):
            with tf.device(device):
                return self.model.train_model(x, training=True)

        def train(x, y):
            with tf.device(device):
                return self._train_body(x, y)

        self._infer = self._compile(infer, [xspec])
        self._forward_train = self._compile(forward_train, [xspec])
        self._train = self._compile(train, [xspec, yspec])

    def _loss(self, outs, y):
        def ce(logits):
            logits = tf.cast(logits, self.loss_dtype)
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

        loss = ce(outs[0])
        for o, w in zip(outs[1:], self.model.aux_weights):
            loss = loss + w * ce(o)
        return loss

    def _train_body(self, x, y):
        opt = self.config.optimizer
        if not self.tvars:  # nothing to learn: forward (BN statistics) and loss only
            outs = self.model.train_model(x, training=True)
            return self._loss(outs if isinstance(outs, (list, tuple)) else [outs], y)
        with tf.GradientTape() as tape:
            outs = self.model.train_model(x, training=True)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            loss = self._loss(outs, y)
            scaled = loss * self.loss_scale if self.loss_scale is not None else loss
        grads = tape.gradient(scaled, self.tvars)
        finite = None
        if self.loss_scale is not None:
            inv = 1.0 / self.loss_scale
            grads = [None if g is None else g * inv for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])

        def apply():
            for v, g, buf in zip(self.tvars, grads, self.momentum_bufs):
                if g is None:  # PyTorch's SGD skips parameters without a gradient
                    continue
                lr, mom = tf.cast(self.lr_var, v.dtype), tf.constant(opt.momentum, v.dtype)
                if opt.weight_decay:
                    g = g + opt.weight_decay * tf.convert_to_tensor(v)
                tf.raw_ops.ResourceApplyMomentum(var=v.handle, accum=buf.handle, lr=lr, grad=g, momentum=mom,
                                                 use_locking=False, use_nesterov=False)
            return tf.constant(True)

        if finite is None:
            apply()
        else:  # dynamic loss scaling (as Keras' LossScaleOptimizer): skip and halve on overflow
            def on_ok():
                apply()
                grow = self.good_steps + 1 >= 2000
                self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
                self.good_steps.assign(tf.where(grow, tf.zeros_like(self.good_steps), self.good_steps + 1))
                return tf.constant(True)

            def on_overflow():
                self.loss_scale.assign(tf.maximum(self.loss_scale / 2.0, 1.0))
                self.good_steps.assign(tf.zeros_like(self.good_steps))
                return tf.constant(False)

            tf.cond(finite, on_ok, on_overflow)
        return loss

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        self.model.set_weights(weights)

    def get_weights(self):
        return self.model.get_weights(lambda v: v.value.numpy())

    def param_counts(self):
        return self.model.param_counts()

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        def constant(m):
            with tf.device(self.device):
                return tf.constant(m)

        self.model.set_masks(masks, constant)
        self._make_functions()

    # steps -------------------------------------------------------------------

    def forward(self, x, train=False):
        with tf.device(self.device):
            xt = tf.constant(self.model.to_native(np.asarray(x, dtype=np.float32)))
        out = self._forward_train(xt) if train else self._infer(xt)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [self.model.from_native(np.asarray(tf.cast(o, tf.float32).numpy())) for o in outs]

    def to_device(self, x, y):
        with tf.device(self.device):
            xt = tf.identity(tf.constant(self.model.to_native(np.asarray(x, dtype=np.float32))))
            yt = tf.identity(tf.constant(np.asarray(y, dtype=np.int64)))
        return xt, yt

    def infer_step(self, batch):
        self._last = self._infer(batch[0])
        return self._last

    def train_step(self, batch):
        if self.train_unsupported:
            raise UnsupportedError(self.train_unsupported)
        if self.momentum_bufs is None:
            with tf.device(self.device):
                self.momentum_bufs = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.tvars]
                # A variable, not a constant, so that a schedule's set_lr needs no retrace.
                self.lr_var = tf.Variable(self.config.optimizer.lr, trainable=False, dtype=tf.float64)
        self._last = self._train(batch[0], batch[1])
        return self._last

    def set_lr(self, lr: float) -> None:
        self.config = replace(self.config, optimizer=replace(self.config.optimizer, lr=lr))
        if self.momentum_bufs is not None:
            self.lr_var.assign(lr)

    def loss_value(self, loss) -> float:
        return float(loss.numpy())

    def synchronize(self) -> None:
        if self.gpu:
            sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
            if sync is not None:
                sync()
                return
        if self._last is not None:  # materialising the last result waits for it
            last = self._last
            first = last[0] if isinstance(last, (list, tuple)) else last
            first.numpy()

    def memory_stats(self) -> dict[str, float]:
        if not getattr(self, "gpu", False):
            return {}
        info = tf.config.experimental.get_memory_info(self.gpu_name)
        return {"alloc_peak_mb": info["peak"] / MB, "alloc_current_mb": info["current"] / MB}
