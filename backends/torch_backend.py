"""PyTorch backend: the IR as an nn.Module, eager or torch.compile, CPU or CUDA.

Conventions handled here (see harness/ops.py for the canonical ones):
    * Layouts are PyTorch's own (OIHW, (out, in)); weights load without transposes.
    * Asymmetric pads, or pads PyTorch's pooling refuses (over half the kernel), are applied
      with F.pad (zeros for conv, -inf for max pooling) and the pooling then runs in ceil
      mode; its output is cut to the IR's size, which also applies the IR's ceil-mode rule.
      Average pooling in that case sums (divisor_override=1) and divides by the IR's divisor
      map, so count_include_pad and overhang follow harness.ops exactly.
    * LRN: PyTorch divides alpha by the window size, so it gets alpha * size.
    * BatchNorm with only one of scale/center: BN without affine plus the one parameter.
    * ReLU and add run in place where torchvision's own models do (the producer is a conv,
      BN, linear or add whose output nobody else reads), which saves memory as theirs does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harness.backend import Backend, BuildConfig, split_device, storage_dtype
from harness.errors import UnsupportedError
from harness.ops import avgpool_divisor

torch = None
nn = None
F = None

INPLACE_PRODUCERS = {"conv2d", "batchnorm", "linear", "add"}


def _import():
    global torch, nn, F
    if torch is None:
        import torch as _torch
        import torch.nn as _nn
        import torch.nn.functional as _F

        torch, nn, F = _torch, _nn, _F


# --------------------------------------------------------------------------- op builders


def _torch_pool_out(n, k, s, p, ceil):
    """PyTorch's own pooling output size (pooling_output_shape)."""
    if ceil:
        out = -(-(n + 2 * p - k) // s) + 1
        if (out - 1) * s >= n + p:
            out -= 1
        return out
    return (n + 2 * p - k) // s + 1


def _build_conv(node, in_shapes, ctx):
    a = node.attrs
    t, b, l, r = a["pad"]
    sym = t == b and l == r
    conv = nn.Conv2d(in_shapes[0][0], a["out_channels"], a["kernel"], a["stride"], (t, l) if sym else 0,
                     a["dilation"], a["groups"], a["bias"])
    params = {"weight": conv.weight}
    if a["bias"]:
        params["bias"] = conv.bias
    if sym:
        return conv, params
    pad = (l, r, t, b)
    return _Seq(lambda x: F.pad(x, pad), conv), params


_Seq = _Cut = _BatchNorm = _Dropout = _DropPath = _SumPool = None  # defined once torch is imported


def _define_modules():
    """Module classes need torch.nn at class-creation time."""
    global _Seq, _Cut, _BatchNorm, _Dropout, _DropPath, _SumPool
    if _Seq is not None:
        return

    class _Seq(nn.Module):  # noqa: N801  (a callable then a module)
        def __init__(self, fn, module):
            super().__init__()
            self.fn, self.module = fn, module

        def forward(self, x):
            return self.module(self.fn(x))

    class _Cut(nn.Module):  # noqa: N801
        """Cuts a pooling output to the IR's size (PyTorch may keep one more ceil window)."""

        def __init__(self, module, ho, wo):
            super().__init__()
            self.module, self.ho, self.wo = module, ho, wo

        def forward(self, x):
            return self.module(x)[..., : self.ho, : self.wo]

    class _BatchNorm(nn.Module):  # noqa: N801
        def __init__(self, c, a, rank):
            super().__init__()
            cls = nn.BatchNorm2d if rank == 3 else nn.BatchNorm1d
            self.affine = a["scale"] and a["center"]
            self.bn = cls(c, eps=a["eps"], momentum=a["momentum"], affine=self.affine)
            self.gamma = nn.Parameter(torch.ones(c)) if a["scale"] and not self.affine else None
            self.beta = nn.Parameter(torch.zeros(c)) if a["center"] and not self.affine else None
            self.shape = (1, c, 1, 1) if rank == 3 else (1, c)

        def forward(self, x):
            y = self.bn(x)
            if self.gamma is not None:
                y = y * self.gamma.view(self.shape)
            if self.beta is not None:
                y = y + self.beta.view(self.shape)
            return y

        def params(self):
            p = {"running_mean": self.bn.running_mean, "running_var": self.bn.running_var}
            if self.affine:
                p.update(weight=self.bn.weight, bias=self.bn.bias)
            if self.gamma is not None:
                p["weight"] = self.gamma
            if self.beta is not None:
                p["bias"] = self.beta
            return p

    class _Dropout(nn.Module):  # noqa: N801
        """Inverted dropout; a fixed keep-mask can be set for parity runs."""

        def __init__(self, rate):
            super().__init__()
            self.rate, self.mask = rate, None

        def forward(self, x):
            if not self.training or self.rate == 0:
                return x
            if self.mask is not None:
                return x * self.mask / (1.0 - self.rate)
            return F.dropout(x, self.rate, True)

    class _DropPath(_Dropout):  # noqa: N801
        """Stochastic depth, one keep decision per sample (torchvision's "row" mode)."""

        def forward(self, x):
            if not self.training or not self.rate:
                return x
            keep = self.mask
            if keep is None:
                keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                                   device=x.device).bernoulli_(1.0 - self.rate)
            else:
                keep = keep.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
            return x * keep / (1.0 - self.rate)

    class _SumPool(nn.Module):  # noqa: N801
        """Average pooling via explicit pads, window sums and the IR's divisor map."""

        def __init__(self, a, in_hw, out_hw):
            super().__init__()
            t, b, l, r = a["pad"]
            self.pad, self.kernel, self.stride, self.out_hw = (l, r, t, b), a["kernel"], a["stride"], out_hw
            div = avgpool_divisor(in_hw, a, out_hw).astype(np.float32)
            self.register_buffer("divisor", torch.from_numpy(div), persistent=False)

        def forward(self, x):
            x = F.pad(x, self.pad)
            s = F.avg_pool2d(x, self.kernel, self.stride, 0, ceil_mode=True, count_include_pad=True, divisor_override=1)
            return s[..., : self.out_hw[0], : self.out_hw[1]] / self.divisor.to(s.dtype)


def _build_pool(node, in_shapes, ctx, kind):
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    H, W = in_shapes[0][1:]
    Ho, Wo = node.shape[1:]
    native = t == b and l == r and t <= kh // 2 and l <= kw // 2
    if kind == "avg":
        if native:
            return nn.AvgPool2d((kh, kw), (sh, sw), (t, l), a["ceil_mode"], a["count_include_pad"]), {}
        return _SumPool(a, (H, W), (Ho, Wo)), {}
    if native:
        return nn.MaxPool2d((kh, kw), (sh, sw), (t, l), ceil_mode=a["ceil_mode"]), {}
    pad = (l, r, t, b)
    pool = nn.MaxPool2d((kh, kw), (sh, sw), 0, ceil_mode=True)
    cut = (_torch_pool_out(H + t + b, kh, sh, 0, True), _torch_pool_out(W + l + r, kw, sw, 0, True)) != (Ho, Wo)

    mod = _Seq(lambda x: F.pad(x, pad, value=-math.inf), pool)
    return (_Cut(mod, Ho, Wo) if cut else mod), {}


def _fn(f):
    """Wraps a parameter-free function as a builder."""
    return lambda node, in_shapes, ctx: (f(node.attrs), {})


def _bn(node, in_shapes, ctx):
    m = _BatchNorm(in_shapes[0][0], node.attrs, len(in_shapes[0]))
    return m, m.params()


def _linear(node, in_shapes, ctx):
    lin = nn.Linear(in_shapes[0][0], node.attrs["out_features"], node.attrs["bias"])
    return lin, ({"weight": lin.weight, "bias": lin.bias} if node.attrs["bias"] else {"weight": lin.weight})


def _shuffle(a):
    g = a["groups"]

    def shuffle(x):
        n, c, h, w = x.shape
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    return shuffle


def _split(a):
    parts, index = a["parts"], a["index"]

    def split(x):
        return torch.chunk(x, parts, dim=1)[index]

    return split


def _add(a):
    def add(*xs):
        out = xs[0] + xs[1]
        for x in xs[2:]:
            out = out + x
        return out

    return add


BUILDERS = {
    "conv2d": _build_conv,
    "linear": _linear,
    "batchnorm": _bn,
    "relu": _fn(lambda a: F.relu),
    "relu6": _fn(lambda a: F.relu6),
    "leaky_relu": _fn(lambda a: (lambda x, s=a["negative_slope"]: F.leaky_relu(x, s))),
    "sigmoid": _fn(lambda a: torch.sigmoid),
    "tanh": _fn(lambda a: torch.tanh),
    "hardswish": _fn(lambda a: F.hardswish),
    "hardsigmoid": _fn(lambda a: F.hardsigmoid),
    "silu": _fn(lambda a: F.silu),
    "softmax": _fn(lambda a: (lambda x: torch.softmax(x, dim=1))),
    "maxpool2d": lambda n, s, c: _build_pool(n, s, c, "max"),
    "avgpool2d": lambda n, s, c: _build_pool(n, s, c, "avg"),
    "adaptive_avgpool2d": lambda n, s, c: (nn.AdaptiveAvgPool2d(n.attrs["output_size"]), {}),
    "global_avgpool": _fn(lambda a: (lambda x: x.mean((2, 3), keepdim=True))),
    "flatten": _fn(lambda a: (lambda x: torch.flatten(x, 1))),
    "dropout": lambda n, s, c: (_Dropout(n.attrs["rate"]), {}),
    "drop_path": lambda n, s, c: (_DropPath(n.attrs["rate"]), {}),
    "lrn": lambda n, s, c: (nn.LocalResponseNorm(n.attrs["size"], n.attrs["alpha"] * n.attrs["size"],
                                                 n.attrs["beta"], n.attrs["k"]), {}),
    "concat": _fn(lambda a: (lambda *xs: torch.cat(xs, dim=1))),
    "add": _fn(_add),
    "mul": _fn(lambda a: (lambda x, y: x * y)),
    "scale": _fn(lambda a: (lambda x, f=a["factor"]: x * f)),
    "channel_shuffle": _fn(_shuffle),
    "channel_split": _fn(_split),
    "identity": _fn(lambda a: (lambda x: x)),
    "zeropad2d": _fn(lambda a: (lambda x, p=(a["pad"][2], a["pad"][3], a["pad"][0], a["pad"][1]): F.pad(x, p))),
}


def _inplace_variant(op):
    if op == "relu":
        return lambda x: F.relu(x, inplace=True)
    if op == "add":
        def add_(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = out.add_(x)
            return out

        return add_
    return None


def _graph_module_class():
    class GraphModule(nn.Module):
        """Runs the IR's nodes in order; intermediates are released after their last use."""

        def __init__(self, ir):
            super().__init__()
            self.ir = ir
            self.layers = nn.ModuleDict()
            self.canonical: dict[str, Any] = {}
            index = {n.name: i for i, n in enumerate(ir.nodes)}
            users: dict[str, int] = {}
            for n in ir.nodes:
                for s in n.inputs:
                    users[s] = users.get(s, 0) + 1
            outputs = {o.node for o in ir.outputs}
            fns: list = [None] * len(ir.nodes)
            keys = {}
            for i, n in enumerate(ir.nodes):
                if n.op == "input":
                    continue
                if n.op not in BUILDERS:
                    raise UnsupportedError(f"torch backend: op {n.op} not implemented")
                in_shapes = [ir.node(s).shape for s in n.inputs]
                module, params = BUILDERS[n.op](n, in_shapes, None)
                src = ir.node(n.inputs[0])
                inplace = _inplace_variant(n.op)
                if (inplace is not None and src.op in INPLACE_PRODUCERS and users.get(src.name) == 1
                        and src.name not in outputs):
                    module = inplace
                if isinstance(module, nn.Module):
                    key = n.name.replace(".", "__")
                    if key in keys:
                        raise UnsupportedError(f"torch backend: node names {n.name} and {keys[key]} collide")
                    keys[key] = n.name
                    self.layers[key] = module
                    fns[i] = ("module", key)
                else:
                    fns[i] = ("fn", module)
                for local, tensor in params.items():
                    self.canonical[f"{n.name}.{local}"] = tensor
            self._fns = fns
            self.plans = {train: self._plan(ir, index, train) for train in (False, True)}
            self.main = index[ir.outputs[0].node]
            self.aux = [(index[o.node], o.weight) for o in ir.outputs[1:]]

        def _plan(self, ir, index, train):
            last = ir.last_use(train)
            plan = []
            for i, n in enumerate(ir.nodes):
                if n.op == "input" or (n.train_only and not train):
                    continue
                free = tuple(index[s] for s in dict.fromkeys(n.inputs) if last.get(s) == i)
                plan.append((i, tuple(index[s] for s in n.inputs), free))
            return plan

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
            if train and self.aux:
                return (vals[self.main], *[vals[j] for j, _ in self.aux])
            return vals[self.main]

    return GraphModule


# --------------------------------------------------------------------------- backend


class TorchBackend(Backend):
    """PyTorch (eager by default; ``compile`` = torch.compile, compile time in the first step)."""

    name = "torch"
    framework = "torch"
    distribution = "torch"
    exec_modes = ("eager", "compile")
    options = {"memory_format": ("contiguous", "channels_last")}
    known_gaps: dict[str, str] = {}
    verifies_fp64 = True

    def import_framework(self) -> None:
        _import()
        _define_modules()

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
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError("torch backend: Ascend devices are not supported")
        if kind == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError("torch backend: CUDA is not available here")
        self.device = torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)
        self.config = config
        self.ir = ir
        prec = config.precision
        if kind == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            torch.backends.cudnn.allow_tf32 = prec == "tf32"
        elif prec == "tf32":
            raise UnsupportedError("torch backend: tf32 exists on CUDA only")
        if prec == "amp-fp16" and kind == "cpu":
            raise UnsupportedError("torch backend: fp16 autocast is a GPU mode; use amp-bf16 on the CPU")
        self.autocast_dtype = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}.get(prec)
        self.dtype = getattr(torch, storage_dtype(prec))
        self.memory_format = (torch.channels_last if config.options.get("memory_format") == "channels_last"
                              else torch.contiguous_format)
        # Made on the device in the dtype: Module.to() would replace BN's running-stat buffers
        # with new tensors, leaving the canonical map (set/get_weights) on stale copies.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                module = _graph_module_class()(ir)
        finally:
            torch.set_default_dtype(previous)
        self.module = module.to(self.device, self.dtype)  # constants made from numpy (pool divisors) follow
        if self.memory_format is torch.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.model = torch.compile(self.module) if config.exec_mode == "compile" else self.module
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum,
                                         weight_decay=opt.weight_decay) if params else None
        self.scaler = torch.amp.GradScaler("cuda") if prec == "amp-fp16" else None

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
        for key, module in self.module.layers.items():
            name = key.replace("__", ".")
            if hasattr(module, "mask"):
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
        outs = out if isinstance(out, tuple) else (out,)
        return [o.detach().float().cpu().numpy() for o in outs]

    def to_device(self, x, y):
        return self._input(x), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)

    def infer_step(self, batch):
        self.module.eval()
        with torch.inference_mode(), self._autocast():
            return self.model(batch[0])

    def loss(self, out, y):
        outs = out if isinstance(out, tuple) else (out,)
        loss = F.cross_entropy(outs[0].to(self.dtype), y)
        for o, (_, w) in zip(outs[1:], self.module.aux):
            loss = loss + w * F.cross_entropy(o.to(self.dtype), y)
        return loss

    def train_step(self, batch):
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
