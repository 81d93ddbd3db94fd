"""The spec-built MindSpore model in a hand-written DATA_PARALLEL training loop (DP overhead benchmark).

    python benchmarks/compare.py --backend mindspore --impl mindspore_dp_loop --model lenet5 --workers 2 \\
        --rounds 3 --python .tox/mindspore/bin/python

The model is built exactly as the runner builds it in one process (the backend's network with
the seeded weights, PyNative or graph as the cell's exec mode says); the data-parallel part is
written by hand as MindSpore's data-parallel tutorial does on the CPU: ``ms.set_device``,
``mindspore.communication.init()`` (the dynamic cluster from the msrun-style MS_ROLE /
MS_SCHED_HOST / MS_SCHED_PORT / MS_WORKER_NUM / MS_NODE_ID variables the launcher sets,
BackendInfo.dp_env, with the scheduler the same helper process the harness starts; mccl on the
CPU), ``ms.set_auto_parallel_context(parallel_mode=DATA_PARALLEL, gradients_mean=True)``, each
rank on its shard of the global batch, then the Cell-API train step of the tutorial's
``Model``/model-repo form: ``nn.TrainOneStepCell(nn.WithLossCell(net,
nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")), nn.Momentum(...))``, which
in DATA_PARALLEL mode wraps its gradients in ``nn.DistributedGradReducer`` (an all-reduce and
the mean over the ranks) before the optimizer. Graph mode: ``ms.jit`` around that Cell (the
first step compiles). No barriers: the all-reduce in each step keeps the ranks in step.

Why TrainOneStepCell and not the tutorial's functional ``ms.value_and_grad`` +
``nn.DistributedGradReducer`` form: the Cell form runs unchanged in both exec modes (ms.jit
over one Cell, as MindSpore's graph-mode scripts and benchmarks/impls/mindspore_resnet50.py
do), and it is the form the framework's ``Model.train`` and the models repository use; the
functional form builds the same gradient graph plus the same reducer call.

How this differs from the harness's step: ``nn.WithLossCell`` over a train-mode forward (the
net's ``forward_train``, main output only) instead of the backend's TrainLoss (which adds the
auxiliary heads' weighted losses: models with auxiliary heads are refused here); its own
nn.Momentum and TrainOneStepCell, made after the parallel context is set (the backend's,
built by build_for before this rank's context is read, is dropped); no barrier before each
step and no per-step loss read back (the harness reads the last loss once, after timing).
"""

from __future__ import annotations

import atexit
import os

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402
from mindspore.communication import get_group_size, get_rank, init, release  # noqa: E402

from samenet.backends.mindspore import INFO  # noqa: E402
from benchmarks.impls import build_for  # noqa: E402
from samenet.data import synthetic_batch  # noqa: E402


class _TrainForward(nn.Cell):
    """The built network's train-mode forward (BN batch statistics), its main output."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        return self.net.forward_train(x)[0]


def setup(cell, rendezvous):
    kind, _, index = cell.device.partition(":")
    target = {"cpu": "CPU", "cuda": "GPU", "ascend": "Ascend"}[kind]
    ms.set_device(target, int(index or 0))  # init() picks its collectives from the device target
    if cell.cpu_settings == "tuned":  # before any kernel runs, as the backend's configure()
        ms.device_context.cpu.op_tuning.threads_num(cell.threads)
    init()
    if get_group_size() != rendezvous.world or get_rank() != rendezvous.rank:
        raise RuntimeError(f"mindspore_dp_loop: joined as rank {get_rank()} of {get_group_size()}")
    atexit.register(release)
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)

    mode = {}

    def check(config):
        mode["exec"] = config.exec_mode or "pynative"
        if mode["exec"] not in ("pynative", "graph"):
            raise ValueError(f"mindspore_dp_loop: exec mode {mode['exec']} not written (pynative, graph)")

    b, ir = build_for(INFO, cell, check)
    net = b.net
    if net.aux_weights:
        raise ValueError(f"mindspore_dp_loop: {cell.model} has auxiliary heads; WithLossCell takes the main output")
    b.train_cell = b.optimizer = b._train = None  # the backend's own step: unused here

    x, y = synthetic_batch(ir, cell.global_batch, cell.seed)
    shard = slice(rendezvous.rank * cell.per_worker_batch, (rendezvous.rank + 1) * cell.per_worker_batch)
    x = ms.Tensor(np.ascontiguousarray(x[shard], dtype=np.float32))
    y = ms.Tensor(y[shard].astype(np.int32))

    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    # One group: MindSpore then decays every trainable parameter (ungrouped it skips beta/gamma).
    opt = nn.Momentum([{"params": net.trainable_params(), "weight_decay": float(cell.weight_decay)}],
                      learning_rate=float(cell.lr), momentum=float(cell.momentum))
    train_net = nn.TrainOneStepCell(nn.WithLossCell(_TrainForward(net), loss), opt)
    if not train_net.reducer_flag:
        raise RuntimeError("mindspore_dp_loop: TrainOneStepCell added no DistributedGradReducer")
    train_net.set_train(True)
    step = ms.jit(train_net) if mode["exec"] == "graph" else train_net

    def sync():
        if target == "CPU":
            from mindspore.common.api import _pynative_executor

            _pynative_executor.sync()
        else:
            ms.runtime.synchronize()

    return (lambda: step(x, y)), sync
