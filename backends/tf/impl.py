"""TensorFlow / Keras 3 backend: the IR as a Keras functional model, tf.function, XLA or eager.

The model is backends/keras/builder.py's, shared with the keras-torch and keras-jax backends
(its docstring has the layouts, padding and weight conventions). This backend replaces a few of
its layers with TensorFlow kernels (backends/tf/layers.py) and runs the steps in TensorFlow:
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
      forward with GradientTape, the loss of samenet.backend's contract (mean sparse CE +
      weighted aux CE), adds L2 weight decay to each gradient and applies PyTorch's momentum
      rule with TF's fused ResourceApplyMomentum (accum = m * accum + g; w -= lr * accum).
      Keras optimizers are not used: their weight_decay is decoupled and their momentum
      form differs in rounding.
    * Precisions: fp32, amp-bf16, fp64 (verification); tf32 and amp-fp16 on a GPU only.
    * Layout channels_first runs wherever TF has NCHW kernels. On this CPU build (oneDNN)
      conv, depthwise, pooling and fused BN accept NCHW in graph and XLA mode; in eager
      mode the CPU MaxPoolGrad kernel is NHWC-only, so an eager NCHW train step of a net
      with max pooling raises UnsupportedError. Nothing is silently transposed by this
      module (Keras itself transposes NCHW pooling on TF, which is why pooling here calls
      tf.nn directly in channels_first).
    * TensorFlow convolutions cannot combine stride > 1 with dilation > 1 (UnsupportedError).
    * Data parallel: tf.distribute.MultiWorkerMirroredStrategy from TFInfo.dp_env's TF_CONFIG,
      RING collectives on the CPU (NCCL on CUDA). Model, momentum buffers and lr are made in
      strategy.scope(); the train step is strategy.run of the same body, whose gradients are
      all-reduced (MEAN) in the replica context before the update. Keras' fit is not used
      (broken under MWMS in Keras 3, keras-team/keras#20585). Graph mode only.

TF_CPP_MIN_LOG_LEVEL and KERAS_BACKEND are set (unless the environment already does, as the
runner's cells do) before TensorFlow and Keras are imported.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import replace
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from samenet.backends.keras.backend import check_keras  # noqa: E402
from samenet.backends.keras.builder import POLICIES, KerasModel  # noqa: E402
from samenet.backends.tf import INTER_OP_THREADS  # noqa: E402
from samenet.backends.tf.layers import TF_LAYERS  # noqa: E402
from samenet.backend import Backend, BuildConfig, split_device  # noqa: E402
from samenet.errors import UnsupportedError  # noqa: E402
from samenet.graph import as_output_list  # noqa: E402

MB = 1024 * 1024


# --------------------------------------------------------------------------- backend


class KerasTFBackend(Backend):
    """TensorFlow 2 + Keras 3 (``graph`` = tf.function, ``xla`` = jit_compile, ``eager``)."""

    strategy = None  # the MultiWorkerMirroredStrategy of a data-parallel rank (init_distributed)

    def import_framework(self) -> None:
        check_keras("tensorflow", "tf")

    def version(self) -> str:
        return tf.__version__

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        applied = True
        if tuned:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(INTER_OP_THREADS)
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
        config = self.info.resolve_config(config)
        self._place(config)
        prec = config.precision
        if self.gpu:  # TF enables TF32 by default on Ampere+; fp32 means true fp32
            tf.config.experimental.enable_tensor_float_32_execution(prec == "tf32")
        self.loss_dtype = tf.float64 if POLICIES[prec] == "float64" else tf.float32
        self.config, self.ir = config, ir
        self.mode = config.exec_mode
        self.channels_last = config.options.get("layout", "channels_last") == "channels_last"
        self.train_unsupported = None
        if (not self.channels_last and not self.gpu and self.mode == "eager"
                and any(n.op == "maxpool2d" for n in ir.nodes)):
            self.train_unsupported = ("tf backend: channels_first train step in eager mode on the CPU: TF's eager CPU "
                                      "MaxPoolGrad kernel supports NHWC only (use exec mode graph or xla)")
        if self.strategy is not None and self.mode != "graph":
            raise UnsupportedError(f"tf backend: data parallel runs in exec mode graph only, not {self.mode} "
                                   "(the MultiWorkerMirroredStrategy step is built and tested as a tf.function)")
        with self._scope(), tf.device(self.device):
            self.model = KerasModel(ir, config, TF_LAYERS, "tf", strided_dilation=False)
        self.tvars = list(self.model.train_model.trainable_weights)
        self.momentum_bufs = None  # made at the first train step (PyTorch's SGD makes them lazily too)
        self.loss_scale = None
        if prec == "amp-fp16":
            with self._scope(), tf.device(self.device):
                self.loss_scale = tf.Variable(2.0 ** 15, trainable=False)
                self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._last = None
        self._make_functions()

    def _place(self, config: BuildConfig) -> None:
        """The TF device of a build; tf32 and amp-fp16 are refused on the CPU."""
        kind, index = split_device(config.device)
        gpus = tf.config.list_physical_devices("GPU")
        if kind == "cuda":
            if not gpus:
                raise UnsupportedError("tf backend: TensorFlow sees no GPU here (tensorflow-cpu build, or no CUDA "
                                       "driver); install tensorflow[and-cuda] on a GPU machine")
            if index >= len(gpus):
                raise UnsupportedError(f"tf backend: no GPU {index} (TensorFlow sees {len(gpus)})")
        if self.strategy is not None:  # the rank's one device (dp_env shows a rank its own GPU only)
            index = 0
        self.device = "/CPU:0" if kind == "cpu" else f"/GPU:{index}"
        self.gpu = kind == "cuda"
        self.gpu_name = f"GPU:{index}"
        if config.precision == "tf32" and not self.gpu:
            raise UnsupportedError("tf backend: tf32 exists on CUDA only")
        if config.precision == "amp-fp16" and not self.gpu:
            raise UnsupportedError("tf backend: fp16 mixed precision is a GPU mode; use amp-bf16 on the CPU")

    def _scope(self):
        """Where variables are made: the strategy's scope in data parallel (mirrored variables)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

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

        if self.strategy is not None:
            strategy, local = self.strategy, train

            def train(x, y):  # noqa: F811  (each rank's own shard; one local replica)
                return strategy.experimental_local_results(strategy.run(local, (x, y)))[0]

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
            return self._loss(as_output_list(self.model.train_model(x, training=True)), y)
        with tf.GradientTape() as tape:
            loss = self._loss(as_output_list(self.model.train_model(x, training=True)), y)
            scaled = loss * self.loss_scale if self.loss_scale is not None else loss
        grads = tape.gradient(scaled, self.tvars)
        if self.strategy is not None:  # the mean of the ranks' gradients, one batched all-reduce
            ctx = tf.distribute.get_replica_context()
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [grads[i] for i in present])
            for i, g in zip(present, reduced):
                grads[i] = g
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
        outs = as_output_list(self._forward_train(xt) if train else self._infer(xt))
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
        self.require_optimizer(self.config)
        if self.train_unsupported:
            raise UnsupportedError(self.train_unsupported)
        if self.momentum_bufs is None:
            with self._scope(), tf.device(self.device):
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

    # data parallel -----------------------------------------------------------

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        """Joins the MultiWorkerMirroredStrategy group of TF_CONFIG (before TF's context starts)."""
        import json

        os.environ.update(self.info.dp_env(rendezvous))  # the runner's env has it already
        kind, _ = split_device(rendezvous.device)
        impl = tf.distribute.experimental.CommunicationImplementation
        transport = impl.NCCL if kind == "cuda" else impl.RING
        options = tf.distribute.experimental.CommunicationOptions(implementation=transport)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        task, replicas = self.strategy.cluster_resolver.task_id, self.strategy.num_replicas_in_sync
        if replicas != rendezvous.world or task != rendezvous.rank:
            raise RuntimeError(f"tf backend: joined as worker {task} of {replicas} replicas, "
                               f"not {rendezvous.rank} of {rendezvous.world}")
        self._collectives: dict = {}
        return {"transport": "nccl" if kind == "cuda" else "ring",
                "dp_engine": "tf.distribute.MultiWorkerMirroredStrategy",
                "tf_config_cluster": json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]}

    def _all_reduce(self, n: int):
        """A compiled SUM all-reduce of ``n`` float32 on the strategy's collectives; returns a
        call that ends synchronised (it reads one element back)."""
        if n not in self._collectives:
            strategy = self.strategy
            with strategy.scope():
                device = strategy.extended.worker_devices[0]
                with tf.device(device):
                    value = tf.ones([n], tf.float32)

            @tf.function
            def reduce():
                def body():  # identity: the replica's own copy, placed on its device
                    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                                          tf.identity(value))
                return strategy.experimental_local_results(strategy.run(body))[0][0]

            self._collectives[n] = lambda: reduce().numpy()
        return self._collectives[n]

    def barrier(self) -> None:
        self._all_reduce(1)()

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        from samenet.distributed import time_collective

        return time_collective(self._all_reduce(max(1, nbytes // 4)), self.barrier, iters)

    def shutdown_distributed(self) -> None:
        # MWMS has no leave call: the gRPC server and the coordination service end with the
        # process. Every rank passed a barrier before this, so no collective is pending.
        self._collectives = {}

    def memory_stats(self) -> dict[str, float]:
        if not getattr(self, "gpu", False):
            return {}
        info = tf.config.experimental.get_memory_info(self.gpu_name)
        return {"alloc_peak_mb": info["peak"] / MB, "alloc_current_mb": info["current"] / MB}
