"""MindSpore backend: the IR's schedule over per-node Cells, PyNative or graph (ms.jit), CPU/GPU/Ascend.

How the IR becomes a MindSpore model (samenet.backends.mindspore.net, .builders, .cells):
    * The builder table (builders.BUILDERS) makes one Layer per node: a Cell for nodes
      with parameters, state or constants (nn.Conv2d, nn.Dense, BatchNorm, pooling, LRN,
      dropout...), a MindSpore function for the parameter-free rest.
    * The network (net.Net) runs samenet.graph's schedule: ``construct`` (eval) and
      ``forward_train`` (train: BN batch statistics, dropout on, auxiliary heads returned)
      loop over a precomputed plan per mode, releasing each value after its last reader,
      so PyNative frees activations as early as the torch backend does.
    * ``graph`` wraps the eval Cell and the training Cell (nn.TrainOneStepCell) in ms.jit:
      the first step compiles. Its network (net.GraphNet) runs the same plans written out as
      straight-line programs, which MindSpore's graph compiler parses far faster than a
      loop (net's docstring has the measurements). ``pynative`` (the default) calls the
      Cells directly.

Conventions handled here (see harness/ops.py for the canonical ones, and builders.py for
layouts, conv padding, pooling pads and adaptive pooling):
    * Max pools concatenate freshly filled -inf borders (no view tensors: see
      cells.MaxPool), except graph-mode training, which keeps nn.MaxPool2d(pad_mode="pad")
      where it applies.
    * BatchNorm: the ops.BatchNorm primitive that nn.BatchNorm2d uses. The primitive takes
      PyTorch-sense momentum (nn.BatchNorm2d's Keras-sense ``momentum`` is turned into
      ``1 - momentum`` before it reaches the primitive), so it gets the IR's momentum as
      is; it updates the running variance with the unbiased batch variance (measured),
      so ``bn_variance`` is "unbiased". scale/center off: a constant ones/zeros tensor.
    * LRN: the op table's formula, the channel-window sum of squares as an (n, 1) average pool
      over (N, 1, C + n - 1, H*W) (window [c - floor(n/2), c + ceil(n/2) - 1], any n). Not
      ops.LRN: TF-like (odd n only) and its CPU kernel fails for many shapes.
    * GELU: ops.gelu(approximate="none"), the erf form.
    * Train step: nn.TrainOneStepCell + nn.Momentum. Momentum is PyTorch's form (ApplyMomentum:
      v = m*v + g; w -= lr*v). MindSpore skips weight decay for parameters named *beta* or
      *gamma* unless parameters are grouped: one group with the weight decay applies it to
      every trainable parameter, as the contract says.
    * No amp: ms.amp.auto_mixed_precision("O1") rewrites a network by parsing its Cells'
      source and returns a new one; the schedule's calls are invisible to it (the old
      module discarded the new network, and the rewrite raised OSError on every zoo model).
    * Data parallel: ParallelMode.DATA_PARALLEL with gradients_mean=True, set before build, so
      nn.TrainOneStepCell wraps its gradients in nn.DistributedGradReducer (the mean over the
      ranks); the group is MindSpore's dynamic cluster (MindSporeInfo.dp_env, the variables msrun
      sets; the scheduler is a helper process), joined by mindspore.communication.init, which
      picks mccl on the CPU. BN running statistics stay per rank ("local").
    * MindSpore litter: glog is quieted (GLOG_v=3 unless set), analyze_fail.ir dumps go to
      MS_OM_PATH (a temp directory unless set; both in samenet.backends.mindspore._quiet), graph
      mode's generated programs live in a temp directory removed at exit; nothing is
      written to the working directory.
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (sets MindSpore's log level and dump path before its import)

import os
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from samenet.backend import Backend, BuildConfig, split_device
from samenet.errors import UnsupportedError

from . import TUNED_ENV
from .cells import Dropout, DropPath
from .net import Forward, TrainLoss, build_net

TARGETS = {"cpu": "CPU", "cuda": "GPU", "ascend": "Ascend"}


def _f32(a) -> np.ndarray:
    """A private float32 copy (a MindSpore Tensor may share a numpy array's memory)."""
    return np.array(a, dtype=np.float32, copy=True, order="C")


class MindSporeBackend(Backend):
    """MindSpore 2.x (PyNative by default; ``graph`` = ms.jit, compile time in the first step)."""

    def version(self) -> str:
        return ms.__version__

    def devices(self) -> list[str]:
        out = ["cpu"]
        for kind, target in (("cuda", "GPU"), ("ascend", "Ascend")):
            if not _pkg_supports(target):
                continue
            try:
                mod = getattr(ms.device_context, "gpu" if target == "GPU" else "ascend")
                count = mod.device_count()
            except Exception:  # noqa: BLE001  (no driver / no device)
                count = 0
            out += [f"{kind}:{i}" for i in range(count)]
        return out

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        """Tuned: oneDNN capped at AVX2 (see TUNED_ENV) and MindSpore's CPU op threads = the budget.

        Both must happen before the first CPU kernel runs (oneDNN reads its ISA cap once;
        MindSpore's thread count can be set once per process); later calls report only.
        """
        from mindspore._c_expression import RuntimeConf

        conf = RuntimeConf.get_instance()
        if tuned:
            for key, value in TUNED_ENV.items():
                os.environ.setdefault(key, value)
            if not conf.is_op_threads_num_configured():
                ms.device_context.cpu.op_tuning.threads_num(threads)
        return {
            "mindspore_op_threads": ms.get_context("runtime_num_threads"),
            "mindspore_op_threads_set": bool(conf.is_op_threads_num_configured()),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }

    # build -------------------------------------------------------------------

    def _select_device(self, kind: str, index: int) -> str:
        target = TARGETS[kind]
        if not _pkg_supports(target):
            raise UnsupportedError(f"mindspore backend: this MindSpore build has no {target} support")
        if kind != "cpu":
            if f"{kind}:{index}" not in self.devices():
                raise UnsupportedError(f"mindspore backend: device {kind}:{index} not available")
        from mindspore._c_expression import DeviceManagerConf

        conf = DeviceManagerConf.get_instance()
        if conf.is_device_enable():
            cur = (conf.get_device_target(), conf.get_device_id())
            if cur != (target, index):
                raise UnsupportedError(f"mindspore backend: this process already runs on {cur[0]}:{cur[1]} "
                                       f"(MindSpore fixes its device once per process)")
            return target
        try:
            ms.set_device(target, index)
        except RuntimeError as e:  # the runtime started before a device was chosen
            if ms.get_context("device_target") != target or index != 0:
                raise UnsupportedError(f"mindspore backend: cannot switch to {target}:{index}: {e}") from None
        return target

    def build(self, ir, config: BuildConfig) -> None:
        kind, index = split_device(config.device)
        prec = config.precision
        if prec not in ("fp32", "tf32"):
            raise UnsupportedError(f"mindspore backend: precision {prec} is not supported")
        if prec == "tf32" and kind != "cuda":
            raise UnsupportedError("mindspore backend: tf32 exists on CUDA only")
        self.target = self._select_device(kind, index)
        self.config = config
        self.ir = ir
        self.graph = config.exec_mode == "graph"
        if kind == "cuda":
            _gpu_tf32(prec == "tf32")
        self.net, self.canonical, self.cells = build_net(ir, config, self.graph)
        self.trainable = self.net.trainable_params()
        opt = config.optimizer
        if opt is None:  # an inference build: no optimiser, no training cell
            self.optimizer, self.train_cell = None, None
        elif self.trainable:
            # One group: MindSpore then decays every parameter of it (ungrouped it skips beta/gamma).
            self.optimizer = nn.Momentum([{"params": self.trainable, "weight_decay": float(opt.weight_decay)}],
                                         learning_rate=float(opt.lr), momentum=float(opt.momentum))
            self.train_cell = nn.TrainOneStepCell(TrainLoss(self.net), self.optimizer)
            self.train_cell.set_train(True)
        else:  # nothing to learn: the step is the train-mode forward (BN statistics) and the loss
            self.optimizer = None
            self.train_cell = TrainLoss(self.net)
        self.eval_cell = Forward(self.net, train=False)
        self.fwd_train_cell = Forward(self.net, train=True)
        self._compile()

    def _compile(self) -> None:
        """The callables the steps use; graph mode wraps them in ms.jit (fresh wrappers recompile)."""
        wrap = ms.jit if self.graph else (lambda c: c)
        self._eval = wrap(self.eval_cell)
        self._fwd_train = wrap(self.fwd_train_cell)
        self._train = wrap(self.train_cell) if self.train_cell is not None else None

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        for name, p in self.canonical.items():
            value = _f32(weights[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {value.shape} != {tuple(p.shape)}")
            p.set_data(Tensor(value))

    def get_weights(self):
        return {name: _f32(p.asnumpy()) for name, p in self.canonical.items()}

    def param_counts(self):
        trainable = sum(int(np.prod(p.shape)) for p in self.net.trainable_params())
        other = sum(int(np.prod(p.shape)) for p in self.net.untrainable_params())
        return trainable, other

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        changed = False
        for name, cell in self.cells.items():
            if not isinstance(cell, Dropout):
                continue
            m = masks.get(name) if masks else None
            if m is None:
                changed |= cell.mask is not None
                cell.mask = None
                continue
            m = np.asarray(m, dtype=np.float32)
            if isinstance(cell, DropPath):
                m = m.reshape((m.shape[0],) + cell.tail)
            cell.mask = Tensor(m.copy())
            changed = True
        if changed and self.graph:
            self._compile()  # masks are graph constants: compile afresh

    # steps -------------------------------------------------------------------

    def _input(self, x):
        return Tensor(_f32(x))

    def forward(self, x, train=False):
        t = self._input(x)
        if train:
            outs = self._fwd_train(t)
        else:
            outs = (self._eval(t),)
        return [o.astype(ms.float32).asnumpy().copy() for o in outs]

    def to_device(self, x, y):
        return self._input(x), Tensor(np.asarray(y, dtype=np.int32))

    def infer_step(self, batch):
        return self._eval(batch[0])

    def train_step(self, batch):
        self.require_optimizer(self.config)
        return self._train(*batch)

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:  # a Parameter: graph mode reads its new value, no recompile
            # In place: the compiled optimizer step holds this Parameter; set_data would swap its
            # storage after the first step and the step would keep the old rate (measured).
            ops.assign(self.optimizer.learning_rate, Tensor(lr, ms.float32))

    def loss_value(self, loss) -> float:
        return float(loss.asnumpy())

    def synchronize(self) -> None:
        if getattr(self, "target", "CPU") == "CPU":  # ms.runtime.synchronize() is for devices (it logs an error on CPU)
            from mindspore.common.api import _pynative_executor

            _pynative_executor.sync()
        else:
            ms.runtime.synchronize()

    # data parallel -------------------------------------------------------------

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        from mindspore.communication import get_group_size, get_rank, init

        kind, index = split_device(rendezvous.device)
        os.environ.update(self.info.dp_env(rendezvous))  # read by init (set already by the runner)
        self._select_device(kind, index)  # init picks its backend from the device target
        init()
        if get_group_size() != rendezvous.world or get_rank() != rendezvous.rank:
            raise RuntimeError(f"mindspore backend: joined as rank {get_rank()} of {get_group_size()}, "
                               f"not {rendezvous.rank} of {rendezvous.world}")
        # Read by nn.TrainOneStepCell when build() makes it: it then adds the grad reducer.
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=rendezvous.world)
        self.rendezvous = rendezvous
        return {"transport": self.info.data_parallel.transports.get(kind), "dp_engine": "DATA_PARALLEL",
                "mindspore_comm_backend": str(_comm_backend())}

    def barrier(self) -> None:
        # mint's barrier is DistCommBarrier, which has a CPU kernel; the Barrier primitive behind
        # mindspore.communication.comm_func.barrier has none ("Unsupported op [Barrier] on CPU").
        from mindspore.mint.distributed import barrier

        barrier()

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        from samenet.distributed import time_collective

        t = Tensor(np.ones(max(1, nbytes // 4), np.float32))
        op = ops.AllReduce()  # sum over the world group

        def allreduce():
            op(t)
            self.synchronize()

        return time_collective(allreduce, self.barrier, iters)

    def shutdown_distributed(self) -> None:
        if getattr(self, "rendezvous", None) is not None:
            from mindspore.communication import release

            release()

    def memory_stats(self) -> dict[str, float]:
        if self.target == "CPU":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": ms.runtime.max_memory_allocated() / mb,
                "reserved_peak_mb": ms.runtime.max_memory_reserved() / mb}


def _pkg_supports(target: str) -> bool:
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().is_pkg_support_device(target))


def _comm_backend() -> str:
    from mindspore.communication.management import GlobalComm

    return GlobalComm.BACKEND


def _gpu_tf32(allow: bool) -> None:
    from mindspore.device_context.gpu import op_precision

    for fn in (op_precision.conv_allow_tf32, op_precision.matmul_allow_tf32):
        try:
            fn(allow)
        except RuntimeError:  # set once per process
            pass
