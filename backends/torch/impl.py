"""PyTorch backend: the IR as an nn.Module, eager or torch.compile, CPU or CUDA.

The package: ``__init__`` (metadata, no torch import), ``layers`` (the nn.Modules torch.nn
lacks), ``builders`` (the builder table, one builder per op), ``impl`` (the graph module and
the backend).

Conventions handled here (see harness/ops.py for the canonical ones):
    * Layouts are PyTorch's own (OIHW, (out, in)); weights load without transposes.
    * Asymmetric pads, or pads PyTorch's pooling refuses (over half the kernel), are applied
      with F.pad (zeros for conv, -inf for max pooling) and the pooling then runs in ceil
      mode; its output is cut to the IR's size, which also applies the IR's ceil-mode rule.
      Average pooling in that case sums (divisor_override=1) and divides by the IR's divisor
      map, so count_include_pad and overhang follow samenet.ops exactly.
    * LRN: PyTorch divides alpha by the window size, so it gets alpha * size.
    * BatchNorm with only one of scale/center: BN without affine plus the one parameter.
    * ReLU and add run in place where torchvision's own models do (the producer is a conv,
      BN, linear or add whose output nobody else reads), which saves memory as theirs does.
    * GELU is the exact erf form (``approximate="none"``).
    * Data parallel: DistributedDataParallel over gloo (CPU) or nccl (CUDA, one GPU per rank);
      BN running statistics follow DDP's broadcast_buffers (rank 0's, copied to every rank
      before each forward); option ``dp_bn=sync`` converts BN to SyncBatchNorm (CUDA only).
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from samenet.backend import Backend, BuildConfig, split_device, storage_dtype
from samenet.distributed import time_collective
from samenet.errors import UnsupportedError
from samenet.graph import as_output_list, layer_names, missing_builders, schedules, unpack_outputs

from .builders import BUILDERS, TorchBuildContext
from .layers import Dropout


class GraphModule(nn.Module):
    """Runs the IR's nodes in order; intermediates are released after their last use.

    Attributes:
        layers: The nodes built as nn.Modules, by layer name (samenet.graph.layer_names).
        keys: Node name -> its key in ``layers`` (nodes built as modules only).
        canonical: IR parameter name -> the tensor holding it.
        plans: ``train`` -> ``(index, inputs, free)`` per step (samenet.graph.Schedule),
            precomputed as plain tuples for the forward's loop.
        outputs: ``train`` -> value slots returned (main first, then the auxiliary heads).
        aux: ``(slot, loss weight)`` of each auxiliary head (train mode).
    """

    def __init__(self, ir, config: BuildConfig | None = None):
        super().__init__()
        missing_builders(ir, BUILDERS, "torch")
        self.ir = ir
        self.layers = nn.ModuleDict()
        self.keys: dict[str, str] = {}
        self.canonical: dict[str, Any] = {}
        ctx = TorchBuildContext(ir, config)
        names = layer_names(ir, "torch")
        fns: list = [None] * len(ir.nodes)
        for i, n in enumerate(ir.nodes):
            if n.name not in names:  # the input
                continue
            layer, params = BUILDERS[n.op](n, ctx)
            if isinstance(layer, nn.Module):
                self.layers[names[n.name]] = layer
                self.keys[n.name] = names[n.name]
                fns[i] = ("module", names[n.name])
            else:
                fns[i] = ("fn", layer)
            for local, tensor in params.items():
                self.canonical[f"{n.name}.{local}"] = tensor
        self._fns = fns
        plans = schedules(ir)
        self.plans = {train: [(s.index, s.inputs, s.free) for s in p.steps] for train, p in plans.items()}
        self.outputs = {train: p.outputs for train, p in plans.items()}
        self.aux = plans[True].aux

    def forward(self, x):
        train = self.training
        vals: list = [None] * len(self._fns)
        vals[0] = x
        for i, ins, free in self.plans[train]:
            kind, f = self._fns[i]
            fn = self.layers[f] if kind == "module" else f
            vals[i] = fn(*[vals[j] for j in ins])
            for j in free:
                vals[j] = None
        return unpack_outputs([vals[j] for j in self.outputs[train]])

    def stochastic(self) -> dict[str, Dropout]:
        """Node name -> its dropout/drop_path layer (those that take fixed masks)."""
        return {name: self.layers[key] for name, key in self.keys.items() if isinstance(self.layers[key], Dropout)}


# --------------------------------------------------------------------------- backend


class TorchBackend(Backend):
    """PyTorch (eager by default; ``compile`` = torch.compile, compile time in the first step).

    Attributes (after build):
        module: The GraphModule (weights, train/eval switch).
        model: What the steps call: ``module``, or torch.compile of it.
    """

    def version(self) -> str:
        return torch.__version__

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        if tuned:
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError:  # already set in this process
                pass
            if torch.cuda.is_available():
                torch.backends.cudnn.benchmark = True
        return {
            "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "torch_config": torch.__config__.parallel_info().splitlines()[0:4],
        }

    def build(self, ir, config: BuildConfig) -> None:
        self.device = self._device(config.device)
        self.config = config
        self.ir = ir
        prec = config.precision
        self._set_precision(prec)
        self.memory_format = (torch.channels_last if config.options.get("memory_format") == "channels_last"
                              else torch.contiguous_format)
        # Made on the device in the dtype: Module.to() would replace BN's running-stat buffers
        # with new tensors, leaving the canonical map (set/get_weights) on stale copies.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                module = GraphModule(ir, config)
        finally:
            torch.set_default_dtype(previous)
        self.module = module.to(self.device, self.dtype)  # constants made from numpy (pool divisors) follow
        if self.memory_format is torch.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.model = self.module
        if getattr(self, "rendezvous", None) is not None:
            self.model = self._data_parallel(config)
        elif config.options.get("dp_bn", "broadcast") != "broadcast":
            raise UnsupportedError("torch backend: dp_bn=sync needs a data-parallel cell (--workers)")
        if config.exec_mode == "compile":
            self.model = torch.compile(self.model)
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = config.optimizer
        # An inference build makes no optimiser: the first torch.optim.SGD imports torch._dynamo (seconds).
        self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum,
                                         weight_decay=opt.weight_decay) if params and opt else None
        self.scaler = torch.amp.GradScaler("cuda") if prec == "amp-fp16" and opt else None

    def _data_parallel(self, config: BuildConfig):
        if config.options.get("dp_bn") == "sync":
            if self.device.type != "cuda":
                raise UnsupportedError("torch backend: SyncBatchNorm runs on CUDA only (dp_bn=sync)")
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.13 deprecates broadcast_buffers (a warning in every rank's log); older torch lacks the new name.
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else "broadcast_buffers")
        return ddp(self.module, device_ids=ids, **{sync: True})

    # data parallel -------------------------------------------------------------

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        kind, _ = split_device(rendezvous.device)
        transport = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(transport, init_method=f"tcp://{rendezvous.coordinator}:{rendezvous.ports[0]}",
                                rank=rendezvous.rank, world_size=rendezvous.world,
                                timeout=datetime.timedelta(seconds=600))
        self.rendezvous = rendezvous
        return {"transport": transport, "dp_engine": "DistributedDataParallel", "torch_dist_backend": dist.get_backend()}

    def barrier(self) -> None:
        dist.barrier()

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=self.device)

        def allreduce():
            dist.all_reduce(t)
            self.synchronize()

        return time_collective(allreduce, dist.barrier, iters)

    def shutdown_distributed(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    @staticmethod
    def _device(device: str):
        kind, index = split_device(device)
        if kind == "ascend":
            raise UnsupportedError("torch backend: Ascend devices are not supported")
        if kind == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError("torch backend: CUDA is not available here")
        return torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)

    def _set_precision(self, prec: str) -> None:
        """TF32 switches (CUDA), the autocast dtype and the storage dtype of ``prec``."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            torch.backends.cudnn.allow_tf32 = prec == "tf32"
        elif prec == "tf32":
            raise UnsupportedError("torch backend: tf32 exists on CUDA only")
        if prec == "amp-fp16" and self.device.type == "cpu":
            raise UnsupportedError("torch backend: fp16 autocast is a GPU mode; use amp-bf16 on the CPU")
        self.autocast_dtype = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(prec)
        self.dtype = getattr(torch, storage_dtype(prec))

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        with torch.no_grad():
            for name, tensor in self.module.canonical.items():
                src = torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32))
                tensor.copy_(src.to(tensor.device))

    def get_weights(self):
        return {name: t.detach().float().cpu().numpy().copy() for name, t in self.module.canonical.items()}

    def param_counts(self):
        trainable = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        stats = sum(b.numel() for name, b in self.module.named_buffers()
                    if name.endswith(("running_mean", "running_var")))
        return trainable, stats

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        for name, module in self.module.stochastic().items():
            m = masks.get(name) if masks else None
            module.mask = None if m is None else torch.from_numpy(np.asarray(m, np.float32)).to(self.device)

    # steps -------------------------------------------------------------------

    def _input(self, x):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)
        return t.contiguous(memory_format=self.memory_format) if t.dim() == 4 else t

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, x, train=False):
        self.module.train(train)
        with torch.no_grad(), self._autocast():
            out = self.model(self._input(x))
        return [o.detach().float().cpu().numpy() for o in as_output_list(out)]

    def to_device(self, x, y):
        return self._input(x), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)

    def infer_step(self, batch):
        self.module.eval()
        with torch.inference_mode(), self._autocast():
            return self.model(batch[0])

    def loss(self, out, y):
        outs = as_output_list(out)
        loss = F.cross_entropy(outs[0].to(self.dtype), y)
        for o, (_, w) in zip(outs[1:], self.module.aux):
            loss = loss + w * F.cross_entropy(o.to(self.dtype), y)
        return loss

    def train_step(self, batch):
        self.require_optimizer(self.config)
        x, y = batch
        self.module.train()
        if self.optimizer is None:  # nothing to learn: forward (BN statistics) and loss only
            with torch.no_grad(), self._autocast():
                return self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(x)
        loss = self.loss(out, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def loss_value(self, loss) -> float:
        return float(loss.item())

    def set_lr(self, lr: float) -> None:
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = lr

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_stats(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": torch.cuda.max_memory_allocated(self.device) / mb,
                "reserved_peak_mb": torch.cuda.max_memory_reserved(self.device) / mb}
