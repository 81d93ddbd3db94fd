"""PaddlePaddle backend: the IR as a paddle.nn.Layer, dynamic graph or paddle.jit.to_static.

The package: samenet.backends.paddle (metadata: capabilities, env vars; imports no framework), this
module (the graph layer and the backend), samenet.backends.paddle.layers (one paddle.nn.Layer per op
kind) and samenet.backends.paddle.builders (the builder table, ``BUILDERS``).

Conventions handled here (see harness/ops.py for the canonical ones):
    * Conv weights are OIHW as in Paddle. Linear weights are (in, out) in Paddle: transposed
      on the way in and out (a transpose is exact, so weights round-trip byte for byte).
    * Conv pads: Paddle's conv takes per-side pads [top, bottom, left, right] natively.
    * Pooling: Paddle's ceil mode keeps a last window that starts in the right padding,
      where PyTorch (and the IR) drop it; its output is cut to the IR's size. Max pooling
      ignores padded elements (as -inf padding does). Average pooling runs natively only
      where Paddle's divisor provably equals the IR's: symmetric pads and no window past
      the pads (Paddle clips asymmetric pads and ceil-mode overhang its own way, and its
      oneDNN kernel, used in static mode, counts overhang as padding). Otherwise it pads
      explicitly, sums (divisor_override=1) and divides by samenet.ops.avgpool_divisor.
      ``exclusive`` is Paddle's name for count_include_pad=False.
    * BatchNorm: Paddle's momentum is the Keras one, 1 - the IR's; scale/center map to
      absent weight/bias (weight_attr=False semantics). Paddle keeps the running statistics
      as non-trainable parameters, so param_counts() reports (trainable, non-trainable) from
      Paddle's own parameter list. Paddle updates the running variance with the *biased*
      batch variance (measured, dynamic and static): bn_variance = "biased".
    * LRN: Paddle's local_response_norm divides alpha by the window size like PyTorch's, so
      it gets alpha * size.
    * hardsigmoid gets slope 1/6 exactly (Paddle's default is 0.1666667); gelu is
      F.gelu(approximate=False), the exact erf form.
    * Train step: mean softmax cross-entropy (+ weighted aux heads), paddle.optimizer.Momentum
      with weight_decay=L2Decay (g + wd * w fused into the momentum update, every trainable
      parameter), v = m * v + g, w -= lr * v: the contract's form.
    * CPU: oneDNN (FLAGS_use_onednn / FLAGS_use_mkldnn) only changes kernels in static
      mode; Paddle 3's dynamic graph runs its native CPU kernels (MKL GEMM) either way.
    * Data parallel: paddle.DataParallel (dynamic graph) over gloo (CPU) or nccl (CUDA), the
      group made by paddle.distributed.init_parallel_env from the PADDLE_* variables of
      PaddleInfo.dp_env. Gradients are averaged over the ranks; BN running statistics stay
      per rank ("local": DataParallel broadcasts buffers only once, at construction).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import paddle

from samenet.backend import VERIFY_PRECISION, Backend, BuildConfig, split_device, storage_dtype
from samenet.errors import UnsupportedError
from samenet.graph import as_output_list, missing_builders, schedules, unpack_outputs
from samenet.ops import INPUT_OP

from .builders import BUILDERS, PaddleContext
from .layers import Dropout, DropPath

ONEDNN_FLAGS = ("FLAGS_use_onednn", "FLAGS_use_mkldnn")  # 3.x name first; older releases know the second only


def known_flags(names) -> list[str]:
    """The flags of ``names`` this Paddle knows."""
    out = []
    for name in names:
        try:
            paddle.get_flags([name])
            out.append(name)
        except (ValueError, RuntimeError):
            pass
    return out


# --------------------------------------------------------------------------- the graph


class GraphLayer(paddle.nn.Layer):
    """Runs the IR's nodes in order (samenet.graph's schedules); intermediates are released
    after their last use.

    Attributes:
        canonical: IR parameter name -> (tensor, transposed).
        node_layers: Node name -> its layer.
        standins: BatchNorm stand-ins whose gradient is cleared after each step.
        aux_weights: Loss weights of the auxiliary outputs (train mode).
    """

    def __init__(self, ir, ctx: PaddleContext):
        super().__init__()
        missing_builders(ir, BUILDERS, "paddle")
        self.layers = paddle.nn.LayerList()
        self.canonical: dict[str, tuple[Any, bool]] = {}
        self.node_layers: dict[str, Any] = {}
        calls: list = [None] * len(ir.nodes)  # by node index; slot 0 is the input
        for i, n in enumerate(ir.nodes):
            if n.op == INPUT_OP:
                continue
            layer, params = BUILDERS[n.op](n, ctx)
            self.layers.append(layer)
            self.node_layers[n.name] = layer
            calls[i] = layer
            for local, entry in params.items():
                self.canonical[f"{n.name}.{local}"] = entry
        object.__setattr__(self, "_calls", calls)  # plain list: no LayerList lookup per node
        self.standins = [t for layer in self.layers for t in getattr(layer, "standins", ())]
        sched = schedules(ir)
        # per mode: (index, input indices, released indices) per step, and the output indices
        self.plans = {train: tuple((s.index, s.inputs, s.free) for s in sched[train].steps) for train in sched}
        self.outputs = {train: sched[train].outputs for train in sched}
        self.size = sched[False].size
        self.aux_weights = tuple(w for _, w in sched[True].aux)

    def forward(self, x):
        return self.run(x)

    # The static conversion traces run() as plain Python (nothing in it depends on a
    # tensor's value) instead of rewriting its loops.
    @paddle.jit.not_to_static
    def run(self, x):
        train = self.training
        vals: list = [None] * self.size
        vals[0] = x
        calls = self._calls
        for i, ins, free in self.plans[train]:
            vals[i] = calls[i](*[vals[j] for j in ins])
            for j in free:
                vals[j] = None
        outs = [vals[j] for j in self.outputs[train]]
        if not paddle.in_dynamic_mode():
            # Paddle 3.3 with oneDNN on: a static program whose output comes straight
            # from a oneDNN kernel (conv, pool, matmul) fails or crashes in run_program
            # ("dst_tensor shall be defined", or SIGSEGV); a copy makes a plain output
            outs = [paddle.assign(o) for o in outs]
        return unpack_outputs(outs)


# --------------------------------------------------------------------------- backend


class PaddleBackend(Backend):
    """PaddlePaddle (dynamic graph by default; ``static`` = paddle.jit.to_static, conversion in
    the first step). Metadata: samenet.backends.paddle.PaddleInfo."""

    def version(self) -> str:
        return paddle.__version__

    def devices(self) -> list[str]:
        out = ["cpu"]
        if paddle.device.is_compiled_with_cuda():
            out += [f"cuda:{i}" for i in range(paddle.device.cuda.device_count())]
        return out

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        core = paddle.base.core
        flags = known_flags(ONEDNN_FLAGS)
        cuda = paddle.device.is_compiled_with_cuda()
        if tuned:
            core.set_num_threads(threads)  # MKL and OpenMP threads of Paddle's CPU kernels
            if core.is_compiled_with_mkldnn():
                paddle.set_flags({f: True for f in flags})
            if cuda:
                paddle.set_flags({"FLAGS_cudnn_exhaustive_search": True})
        settings: dict[str, Any] = {
            "paddle_num_threads": threads if tuned else None,  # None: Paddle's default
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "onednn_compiled": bool(core.is_compiled_with_mkldnn()),
            "onednn_used": "static-mode inference only (dynamic graph has no oneDNN kernels; static "
                           "training is lowered with oneDNN off: Paddle 3.3's oneDNN training kernels are wrong)",
        }
        settings.update({f: bool(v) for f, v in paddle.get_flags(flags).items()})
        if cuda:
            settings["FLAGS_cudnn_exhaustive_search"] = bool(
                paddle.get_flags(["FLAGS_cudnn_exhaustive_search"])["FLAGS_cudnn_exhaustive_search"])
        return settings

    def build(self, ir, config: BuildConfig) -> None:
        self.place = self._place(config.device)
        self._set_precision(config.precision, self.place)
        paddle.set_device(self.place)
        self.config = config
        self.ir = ir
        self.exec_mode = config.exec_mode or self.info.exec_modes[0]
        dtype = storage_dtype(config.precision)
        self.np_dtype = np.dtype(dtype).type
        previous = paddle.get_default_dtype()
        paddle.set_default_dtype(dtype)  # parameters and buffers
        try:
            self.module = GraphLayer(ir, PaddleContext(ir, config, dtype))
        finally:
            paddle.set_default_dtype(previous)
        self._train = None
        self._onednn_flags = known_flags(ONEDNN_FLAGS)
        self.model = self._convert() if self.exec_mode == "static" else self.module
        if getattr(self, "rendezvous", None) is not None:
            if self.exec_mode == "static":
                raise UnsupportedError("paddle backend: data parallel runs in the dynamic graph only")
            self.model = paddle.DataParallel(self.module)
        training = config.optimizer is not None  # an inference build makes no optimiser
        self.optimizer = self._optimizer(config.optimizer) if training else None
        self.scaler = paddle.amp.GradScaler() if config.precision == "amp-fp16" and training else None

    @staticmethod
    def _place(device: str) -> str:
        """Paddle's place of a device (``gpu:N`` for ``cuda:N``), refusing what this Paddle lacks."""
        kind, index = split_device(device)
        if kind == "ascend":
            raise UnsupportedError("paddle backend: Ascend devices are not supported")
        if kind == "cpu":
            return "cpu"
        if not paddle.device.is_compiled_with_cuda():
            raise UnsupportedError("paddle backend: this paddle is a CPU build (install paddlepaddle-gpu for CUDA)")
        if index >= paddle.device.cuda.device_count():
            raise UnsupportedError(f"paddle backend: no CUDA device {index} here")
        return f"gpu:{index}"

    def _set_precision(self, prec: str, place: str) -> None:
        """TF32 and autocast settings; tf32 and amp-* are CUDA-only."""
        if place == "cpu":
            if prec not in ("fp32", VERIFY_PRECISION):
                raise UnsupportedError(f"paddle backend: precision {prec} is supported on CUDA only")
        else:
            # Paddle allows TF32 by default on Ampere+; fp32 means true fp32
            if prec != "tf32":
                os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
            paddle.base.core.set_cublas_switch(prec == "tf32")
        self.amp_dtype = {"amp-bf16": "bfloat16", "amp-fp16": "float16"}.get(prec)

    def _optimizer(self, opt):
        """Momentum SGD over the trainable parameters (None when there are none)."""
        params = [p for p in self.module.parameters() if not p.stop_gradient]
        if not params:
            return None
        return paddle.optimizer.Momentum(
            learning_rate=opt.lr, momentum=opt.momentum, parameters=params, use_nesterov=False,
            weight_decay=paddle.regularizer.L2Decay(opt.weight_decay) if opt.weight_decay else None,
        )

    # data parallel -------------------------------------------------------------

    def init_distributed(self, rendezvous) -> dict[str, Any]:
        import paddle.distributed as dist

        kind, _ = split_device(rendezvous.device)
        transport = "nccl" if kind == "cuda" else "gloo"
        os.environ.update(self.info.dp_env(rendezvous))  # read by init_parallel_env (set already by the runner)
        paddle.set_device(self._place(rendezvous.device))
        dist.init_parallel_env()
        if dist.get_world_size() != rendezvous.world or dist.get_rank() != rendezvous.rank:
            raise RuntimeError(f"paddle backend: joined as rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"not {rendezvous.rank} of {rendezvous.world}")
        self.rendezvous = rendezvous
        return {"transport": transport, "dp_engine": "paddle.DataParallel",
                "paddle_dist_backend": os.environ.get("PADDLE_DISTRI_BACKEND")}

    def barrier(self) -> None:
        import paddle.distributed as dist

        dist.barrier()

    def allreduce_seconds(self, nbytes: int, iters: int) -> list[float]:
        import paddle.distributed as dist

        from samenet.distributed import time_collective

        t = paddle.ones([max(1, nbytes // 4)], dtype="float32")

        def allreduce():
            dist.all_reduce(t)
            self.synchronize()

        return time_collective(allreduce, dist.barrier, iters)

    def shutdown_distributed(self) -> None:
        import paddle.distributed as dist

        if getattr(self, "rendezvous", None) is not None and dist.is_initialized():
            dist.destroy_process_group()

    def _convert(self):
        fwd = self.module.forward
        if hasattr(fwd, "rollback"):  # already converted: start from the dygraph function again
            fwd.rollback()
        return paddle.jit.to_static(self.module, full_graph=True, backend=None)

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        with paddle.no_grad():
            for name, (tensor, transposed) in self.module.canonical.items():
                w = np.asarray(weights[name], dtype=self.np_dtype)
                tensor.set_value(np.ascontiguousarray(w.T if transposed else w))

    def get_weights(self):
        out = {}
        for name, (tensor, transposed) in self.module.canonical.items():
            w = tensor.numpy().astype(np.float32, copy=False)
            out[name] = np.ascontiguousarray(w.T if transposed else w).copy()
        return out

    def param_counts(self):
        trainable = non = 0
        for p in self.module.parameters():
            n = int(np.prod(p.shape)) if len(p.shape) else 1
            if p.stop_gradient or not getattr(p, "trainable", True):
                non += n
            else:
                trainable += n
        return trainable, non

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        layers = [(name, layer) for name, layer in self.module.node_layers.items() if isinstance(layer, Dropout)]
        for name, layer in layers:
            m = masks.get(name) if masks else None
            if m is not None:
                m = np.asarray(m, self.np_dtype)
                if isinstance(layer, DropPath):
                    m = m.reshape((m.shape[0],) + (1,) * len(self.ir.node(name).shape))
                m = paddle.to_tensor(m, place=self.place)
            layer.mask = m
        if layers and self.exec_mode == "static":
            self.model = self._convert()  # fixed or random masks are different programs

    # steps -------------------------------------------------------------------

    def _input(self, x):
        return paddle.to_tensor(np.ascontiguousarray(x, dtype=self.np_dtype), place=self.place)

    def _autocast(self):
        if self.amp_dtype is None:
            return paddle.amp.auto_cast(enable=False)
        return paddle.amp.auto_cast(enable=True, level="O1", dtype=self.amp_dtype)

    def _set_mode(self, train: bool) -> None:
        if self._train is not train:  # Layer.train()/eval() walk every sublayer: only on change
            self.module.train() if train else self.module.eval()
            self._train = train

    @contextlib.contextmanager
    def _train_flags(self):
        """Static mode trains with oneDNN off (kernels are chosen when a program is first
        lowered, so the eval program keeps oneDNN). Paddle 3.3's oneDNN training kernels are
        wrong (measured): BN running statistics never update, max-pool gradients read the
        workspace in the wrong layout (wrong gradients, dnnl::error with two pools), BN
        without scale aborts in its backward."""
        if self.exec_mode != "static" or self.place != "cpu":
            yield
            return
        saved = paddle.get_flags(self._onednn_flags)
        if not any(saved.values()):
            yield
            return
        paddle.set_flags({f: False for f in saved})
        try:
            yield
        finally:
            paddle.set_flags(saved)

    def forward(self, x, train=False):
        self._set_mode(train)
        with paddle.no_grad(), self._autocast(), (self._train_flags() if train else contextlib.nullcontext()):
            out = self.model(self._input(x))
        outs = as_output_list(out)
        return [o.astype("float32").numpy() for o in outs]

    def to_device(self, x, y):
        return self._input(x), paddle.to_tensor(np.asarray(y, dtype=np.int64), place=self.place)

    def infer_step(self, batch):
        self._set_mode(False)
        with paddle.no_grad(), self._autocast():
            return self.model(batch[0])

    @staticmethod
    def _cross_entropy(logits, y_col):
        """Mean softmax cross-entropy as logsumexp(s) - s_y with s = z - max(z).

        Not F.cross_entropy: Paddle's softmax (and so cross_entropy and log_softmax) clips
        z - max(z) at -64, which caps a sample's loss near 64 (measured: 64.07 where it is
        107). The shift by the (constant) max keeps a small loss exact, as PyTorch's
        log_softmax does; logsumexp(z) - z_y would lose it to cancellation.
        """
        z = logits if logits.dtype == paddle.float64 else logits.astype("float32")  # float64: verification
        s = z - z.max(axis=1, keepdim=True).detach()
        return (paddle.logsumexp(s, axis=1) - paddle.take_along_axis(s, y_col, axis=1).squeeze(1)).mean()

    def loss(self, out, y):
        outs = as_output_list(out)
        y_col = y.unsqueeze(1)
        loss = self._cross_entropy(outs[0], y_col)
        for o, w in zip(outs[1:], self.module.aux_weights):
            loss = loss + w * self._cross_entropy(o, y_col)
        return loss

    def train_step(self, batch):
        self.require_optimizer(self.config)
        x, y = batch
        self._set_mode(True)
        if self.optimizer is None:  # nothing to learn: forward (BN statistics) and loss only
            with self._train_flags(), paddle.no_grad(), self._autocast():
                return self.loss(self.model(x), y)
        with self._train_flags():
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
            self.optimizer.clear_grad(set_to_zero=False)
            for t in self.module.standins:
                t.clear_gradient(False)
        return loss.detach()

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:  # the step runs in Python in both modes: no retrace needed
            self.optimizer.set_lr(lr)

    def loss_value(self, loss) -> float:
        return float(loss.item())

    def synchronize(self) -> None:
        if getattr(self, "place", "cpu") != "cpu":
            paddle.device.synchronize(self.place)

    def memory_stats(self) -> dict[str, float]:
        if self.place == "cpu":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": paddle.device.cuda.max_memory_allocated(self.place) / mb,
                "reserved_peak_mb": paddle.device.cuda.max_memory_reserved(self.place) / mb}
