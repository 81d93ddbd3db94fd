"""MXNet (Gluon) backend: the IR as a Gluon HybridBlock, imperative or hybridized, CPU or GPU.

MXNet is retired upstream (1.9.1 is its last release). The package: ``samenet.backends.mxnet``
(metadata, no framework), ``builders`` (one builder per op, ``BUILDERS``), ``graph`` (the
compiled program and the HybridBlock that runs it), this module (the backend).

Structure:
    * The IR is compiled once into a program (samenet.backends.mxnet.graph.Program): per node a
      small function written against MXNet's operator namespace ``F`` (``mx.nd``
      imperatively, ``mx.sym`` when traced), so the same code runs both ways. Two Graph
      HybridBlocks share the Gluon Parameters: the eval graph (main output) and the train
      graph (loss, main output, auxiliary outputs).
    * ``hybridized`` = ``hybridize(static_alloc=True, static_shape=True)``; the trace happens
      at the first call of each graph, i.e. inside the first step.

MXNet-specific semantics worth knowing:
    * BN running statistics are updated in the backward pass (CPU), not in the forward:
      ``forward(x, train=True)`` leaves them as they are; a train step of a model without
      trainable parameters differentiates with respect to the input to get them updated.
    * On GPU, cuDNN's BatchNorm updates the running variance with the unbiased batch
      variance (apache/mxnet#21111), MXNet's own kernels with the biased one: see
      ``bn_variance`` in the metadata.

Train step (samenet.backend contract): mean softmax cross-entropy (plus weighted auxiliary
heads) inside the train graph; ``autograd.record``, ``backward``, then a gluon Trainer with
MXNet's SGD (momentum, wd). MXNet's SGD is ``state = m * state + lr * (g + wd * w); w -= state``
with rescale_grad 1 (the loss is already a mean), i.e. PyTorch's rule with state = lr * v
for a constant lr; Gluon applies wd to every parameter (wd_mult 1), as PyTorch does.

Data parallel (``init_distributed``): a ``dist_sync`` kvstore (ps-lite; the scheduler and one
server are the harness's helper processes, see the metadata). The Trainer takes it with
``update_on_kvstore=False``: each step pushes every gradient, the server sums the workers'
(sync mode) and every worker pulls the sum, then runs the same SGD locally with
``rescale_grad = 1/world`` (``trainer.step(world)``): ``g = sum/world``, ``state = m*state +
lr*(g + wd*w)``, the written rule on the mean gradient. The first step broadcasts rank 0's
parameters (kvstore.broadcast). BN running statistics are aux states, updated by each
worker's backward and never pushed: ``local``. One data-parallel build per process (the
Trainer's kvstore keys 0..n-1 stay on the server).
"""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Any

import mxnet as mx
import numpy as np

from samenet.backend import Backend, BuildConfig, split_device, storage_dtype
from samenet.errors import UnsupportedError

from .graph import Graph, Program


class MXNetBackend(Backend):
    """Apache MXNet 1.9 Gluon (``imperative`` by default; ``hybridized`` = static CachedOp)."""

    def version(self) -> str:
        return mx.__version__

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(self._num_gpus())]

    @staticmethod
    def _num_gpus() -> int:
        try:
            return mx.context.num_gpus()
        except Exception:  # noqa: BLE001  (a CPU build without CUDA libraries)
            return 0

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        if tuned:
            mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(threads))
        feats = mx.runtime.Features()
        keys = ("OMP_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS", "MXNET_MKLDNN_ENABLED", "MXNET_ENGINE_TYPE",
                "KMP_AFFINITY", "MXNET_SUBGRAPH_BACKEND")
        return {
            "omp_threads": threads if tuned else os.environ.get("OMP_NUM_THREADS"),
            "env": {k: os.environ.get(k) for k in keys if os.environ.get(k) is not None},
            "mkldnn": bool(feats.is_enabled("MKLDNN")) and os.environ.get("MXNET_MKLDNN_ENABLED", "1") != "0",
            "cuda": bool(feats.is_enabled("CUDA")),
            "cudnn": bool(feats.is_enabled("CUDNN")),
            "blas": next((b for b in ("BLAS_MKL", "BLAS_OPEN", "BLAS_ATLAS", "BLAS_APPLE") if feats.is_enabled(b)), None),
        }

    # build -----------------------------------------------------------------------

    def build(self, ir, config: BuildConfig) -> None:
        config = self.info.resolve_config(config)
        self.ctx = self._device(config.device)
        prec = config.precision
        if prec == "tf32" and self.ctx.device_type != "gpu":
            raise UnsupportedError("mxnet backend: tf32 is a GPU precision (fp32 on the CPU)")
        self.dtype = storage_dtype(prec)
        if self.ctx.device_type == "gpu" and prec == "fp32":
            # cuDNN/cuBLAS use TF32 on Ampere+ unless told not to; MXNet has no switch of its own
            os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
        self.config = config
        self.ir = ir
        self.hybridized = config.exec_mode == "hybridized"
        self.program = Program(ir, config, self.ctx, self.dtype)
        self.eval_net = Graph(self.program, train=False)
        self.train_net = Graph(self.program, train=True)
        if self.hybridized:
            for net in (self.eval_net, self.train_net):
                net.hybridize(static_alloc=True, static_shape=True)
        self.trainable = {k: p for k, p in self.program.params.items() if p.grad_req != "null"}
        # An inference build makes no Trainer (nor, in a data-parallel cell, its kvstore keys).
        self.trainer = self._trainer(config.optimizer) if config.optimizer is not None else None
        self.masks: list = []
        self._gpu_peak = 0.0

    # data parallel -----------------------------------------------------------------

    _world = 1
    _BENCH_KEY = 1 << 20  # the all-reduce benchmark's kvstore keys (the Trainer's are 0..n-1)

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        self.rendezvous = rendezvous
        self.kv = mx.kv.create("dist_sync")  # joins ps-lite (DMLC_* from dp_env); barrier of all nodes
        if self.kv.num_workers != rendezvous.world:
            raise RuntimeError(f"mxnet backend: kvstore has {self.kv.num_workers} workers, not {rendezvous.world}")
        self._world = self.kv.num_workers
        self._bench_keys = 0
        return {"transport": self.info.data_parallel.transports["cpu"], "dp_engine": "kvstore dist_sync",
                "kvstore_type": self.kv.type, "kvstore_rank": self.kv.rank, "kvstore_workers": self.kv.num_workers}

    def barrier(self) -> None:
        self.kv._barrier()

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        ctx = getattr(self, "ctx", None) or mx.cpu()
        key = self._BENCH_KEY + self._bench_keys
        self._bench_keys += 1
        t = mx.nd.ones((max(1, nbytes // 4),), ctx=ctx, dtype=np.float32)
        self.kv.init(key, t)
        mx.nd.waitall()  # rank 0's initial value delivered before any rank pushes (_init_kvstore)
        self.kv._barrier()

        def allreduce():  # the server sums the workers' pushes; each pulls the sum
            self.kv.pushpull(key, t, out=t)
            t.wait_to_read()

        from samenet.distributed import time_collective

        return time_collective(allreduce, self.kv._barrier, iters)

    def shutdown_distributed(self) -> None:
        """Frees the kvstore: its destructor barriers the workers, rank 0 stops the servers,
        and every node finalizes ps-lite (the helpers then wait to be ended)."""
        if getattr(self, "kv", None) is None:
            return
        mx.nd.waitall()
        self.trainer = None
        self.kv = None
        gc.collect()

    def _device(self, device: str):
        """The MXNet context of a device name the metadata declares (cpu, cuda:N)."""
        kind, index = split_device(device)
        if kind == "cpu":
            return mx.cpu()
        if not mx.runtime.Features().is_enabled("CUDA"):
            raise UnsupportedError("mxnet backend: this MXNet build has no CUDA (install mxnet-cuXXX)")
        if index >= self._num_gpus():
            raise UnsupportedError(f"mxnet backend: no GPU {index} here ({self._num_gpus()} found)")
        return mx.gpu(index)

    def _trainer(self, opt):
        """MXNet's SGD over the trainable parameters (None when there are none)."""
        kv = getattr(self, "kv", None)
        if kv is not None:
            if getattr(self, "_kv_trainer_built", False):
                raise UnsupportedError("mxnet backend: one data-parallel build per process (kvstore keys)")
            self._kv_trainer_built = True
        if not self.trainable:
            return None
        return mx.gluon.Trainer(
            list(self.trainable.values()), "sgd",
            {"learning_rate": opt.lr, "momentum": opt.momentum, "wd": opt.weight_decay, "rescale_grad": 1.0},
            kvstore=kv, update_on_kvstore=False)

    # weights ---------------------------------------------------------------------

    def set_weights(self, weights) -> None:
        for name, param in self.program.params.items():
            param.set_data(mx.nd.array(np.ascontiguousarray(weights[name], dtype=self.dtype), ctx=self.ctx,
                                       dtype=self.dtype))

    def get_weights(self):
        return {name: p.data(self.ctx).asnumpy().astype(np.float32, copy=True)
                for name, p in self.program.params.items()}

    def param_counts(self):
        trainable = sum(int(np.prod(p.shape)) for p in self.program.params.values() if p.grad_req != "null")
        fixed = sum(int(np.prod(p.shape)) for p in self.program.params.values() if p.grad_req == "null")
        return trainable, fixed

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        self.masks = []
        order = []
        for node in self.program.mask_nodes:
            rate = node.attrs["rate"]
            if not masks or node.name not in masks or not rate:
                continue
            m = np.asarray(masks[node.name], dtype=self.dtype) / np.dtype(self.dtype).type(1.0 - rate)
            if node.op == "drop_path":  # one keep per sample
                m = m.reshape((-1,) + (1,) * len(node.shape))
            self.masks.append(mx.nd.array(m, ctx=self.ctx, dtype=self.dtype))
            order.append(self.program.slots[node.name])
        self.train_net.set_mask_order(order)

    # steps -----------------------------------------------------------------------

    def _x(self, x):
        return mx.nd.array(np.ascontiguousarray(x, dtype=self.dtype), ctx=self.ctx, dtype=self.dtype)

    def forward(self, x, train=False):
        xa = self._x(x)
        if not train:
            out = [self.eval_net(xa)]
        else:
            y = mx.nd.zeros((xa.shape[0],), ctx=self.ctx, dtype=self.dtype)
            with mx.autograd.train_mode():
                res = self.train_net(xa, y, *self.masks)
            out = list(res[1:])
        return [o.asnumpy().astype(np.float32, copy=False) for o in out]

    def to_device(self, x, y):
        return self._x(x), mx.nd.array(np.asarray(y), ctx=self.ctx, dtype=self.dtype)  # pick's indices

    def infer_step(self, batch):
        return self.eval_net(batch[0])

    def train_step(self, batch):
        self.require_optimizer(self.config)
        x, y = batch
        if self.trainer is None:
            # nothing to learn, but MXNet updates BN running statistics in the backward pass:
            # differentiate with respect to (a copy of) the input instead
            x = x.copy()
            x.attach_grad()
        with mx.autograd.record(train_mode=True):
            loss = self.train_net(x, y, *self.masks)[0]
        loss.backward()
        if self.trainer is not None:
            if getattr(self, "kv", None) is not None and not self.trainer._kv_initialized:
                self._init_kvstore()
            # rescale_grad = 1/world: the kvstore's sum of the ranks' gradients becomes their mean
            self.trainer.step(self._world)
        return loss

    def _init_kvstore(self) -> None:
        """The Trainer's kvstore keys, initialised from rank 0's weights, delivered before any rank pushes.

        kvstore.init returns (and its barrier passes) once rank 0's pushes of the initial
        values are queued, not delivered: a gradient push of another rank could reach the
        server first and be taken for the key's initial value (apache/mxnet#7893). Here that
        gave lenet5's last key, fc3.bias, a wrong first update in about a third of the runs.
        Waiting for the pushes' replies on every rank, then a barrier, orders them.
        """
        trainer = self.trainer
        trainer._init_kvstore()
        if trainer._params_to_init:
            trainer._init_params()  # rank 0's values to the server, pulled by every rank
        mx.nd.waitall()
        self.kv._barrier()

    def set_lr(self, lr: float) -> None:
        """MXNet's SGD keeps ``state = lr * v`` (PyTorch's v): rescaling the states by
        new/old keeps the written rule exact across a change. Going to lr 0 loses v."""
        if self.trainer is None:
            return
        old = self.trainer.learning_rate
        if old != lr:
            ratio = lr / old if old else 0.0
            for updater in getattr(self.trainer, "_updaters", []):
                for state in updater.states.values():
                    for s in state if isinstance(state, (tuple, list)) else (state,):
                        if s is not None:
                            s *= ratio
        self.trainer.set_learning_rate(lr)

    def loss_value(self, loss) -> float:
        return float(loss.asscalar())

    def synchronize(self) -> None:
        mx.nd.waitall()
        if self.ctx.device_type == "gpu":
            self._sample_gpu()

    def _sample_gpu(self) -> None:
        free, total = mx.context.gpu_memory_info(self.ctx.device_id)
        self._gpu_peak = max(self._gpu_peak, (total - free) / (1024 * 1024))

    def memory_stats(self) -> dict[str, float]:
        if getattr(self, "ctx", None) is None or self.ctx.device_type != "gpu":
            return {}
        self._sample_gpu()
        # MXNet's pooled allocator keeps what it took: the device's used memory, sampled at
        # each synchronize, is its reserved peak (the device's, all processes together).
        return {"reserved_peak_mb": self._gpu_peak}
