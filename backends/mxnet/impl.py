"""MXNet (Gluon) backend: the IR as a Gluon HybridBlock, imperative or hybridized, CPU or GPU.

MXNet is retired upstream (1.9.1 is its last release); everything MXNet-specific lives in
this one module, which imports the framework only inside methods.

Structure:
    * The IR is compiled once into a program: per node a small function ``fn(F, inputs, P,
      ctx)`` written against MXNet's operator namespace ``F`` (``mx.nd`` imperatively,
      ``mx.sym`` when traced), so the same code runs both ways. One ``_Graph`` HybridBlock
      interprets the program; two of them share the Gluon Parameters: the eval graph (main
      output) and the train graph (loss, main output, auxiliary outputs: the loss is part of
      the graph, so a hybridized train step is one cached op plus the update).
    * ``hybridized`` = ``hybridize(static_alloc=True, static_shape=True)``; the trace happens
      at the first call of each graph, i.e. inside the first step.

Conventions handled here (harness/ops.py holds the canonical ones):
    * Layouts: MXNet is NCHW with OIHW conv weights (I = C / groups) and (out, in) FC weights,
      like the canon: weights load as they are, byte-exact.
    * Conv pads: symmetric pads are Convolution's own; asymmetric ones an explicit zero pad.
    * Max pooling: symmetric pads are Pooling's own (it ignores padded cells, i.e. -inf);
      asymmetric ones an explicit pad of -inf. Ceil mode uses pooling_convention "full",
      whose rule keeps a last window that starts in the right padding (PyTorch drops it):
      the output is cut to the IR's size.
    * Average pooling: native Pooling (MXNet's divisor rule is PyTorch's, count_include_pad
      included) when pads are symmetric and the output needs no cut; otherwise an explicit
      zero pad, pool_type "sum" and division by harness.ops.avgpool_divisor (a constant), so
      count_include_pad and the ceil-mode overhang follow the canon exactly.
    * adaptive_avgpool2d: contrib.AdaptiveAvgPooling2D uses PyTorch's bins
      (harness.ops.adaptive_pool_matrix); checked by the conformance cases.
    * BatchNorm: MXNet's momentum is the weight of the running value (running = momentum *
      running + (1 - momentum) * batch): it gets 1 - IR momentum. MXNet updates the running
      variance with the biased batch variance (bn_variance = "biased"). scale/center off:
      gamma ones / beta zeros made in the graph (fix_gamma for a missing scale).
    * LRN: MXNet's LRN divides alpha by nsize (Caffe), so it gets alpha * size; its window
      is only the canon's for odd sizes, even sizes use an explicit sum over a padded
      channel window.
    * Dropout: native Dropout; drop_path: Dropout with ``axes`` = all but the batch axis
      (one Bernoulli per sample). Fixed keep-masks (set_masks) enter the graph as inputs.
      In the eval graph both are skipped.
    * ReLU, sigmoid, tanh use ``Activation`` (oneDNN-backed on CPU): ``F.relu`` is not, and
      would make oneDNN reorder every conv output back to plain layout (-35% at inference).

MXNet-specific semantics worth knowing:
    * BN running statistics are updated in the backward pass (CPU), not in the forward:
      ``forward(x, train=True)`` leaves them as they are; a train step of a model without
      trainable parameters differentiates with respect to the input to get them updated.
    * On GPU, cuDNN's BatchNorm updates the running variance with the unbiased batch
      variance (apache/mxnet#21111), MXNet's own kernels with the biased one: see
      ``bn_variance`` below.

Train step (harness.backend contract): mean softmax cross-entropy (plus weighted auxiliary
heads) inside the train graph; ``autograd.record``, ``backward``, then a gluon Trainer with
MXNet's SGD (momentum, wd). MXNet's SGD is ``state = m * state + lr * (g + wd * w); w -= state``
with rescale_grad 1 (the loss is already a mean), i.e. PyTorch's rule with state = lr * v
for a constant lr; Gluon applies wd to every parameter (wd_mult 1), as PyTorch does.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any

import numpy as np

from harness.backend import VERIFY_PRECISION, Backend, BuildConfig, split_device, storage_dtype
from harness.errors import UnsupportedError
from harness.ops import TRAIN_ONLY_OPS, avgpool_divisor

mx = None


def _import():
    global mx
    if mx is None:
        import mxnet as _mx

        mx = _mx


# --------------------------------------------------------------------------- helpers


def _mx_pool_out(n, k, s, p, full):
    """MXNet's Pooling output size (pad p per side, 'valid' or 'full' convention)."""
    span = n + 2 * p - k
    return 1 + (-(-span // s) if full else span // s)


class _Ctx:
    """Per-call state handed to the node functions (fixed masks by node index)."""

    __slots__ = ("masks",)

    def __init__(self, masks):
        self.masks = masks


class _Node:
    """One compiled node: its function, its inputs, the parameters and constants it reads."""

    __slots__ = ("index", "name", "op", "attrs", "shape", "fn", "inputs", "params", "consts", "train_only", "free")

    def __init__(self, index, n, inputs):
        self.index, self.name, self.op, self.attrs, self.shape = index, n.name, n.op, n.attrs, tuple(n.shape)
        self.inputs, self.train_only = inputs, n.train_only
        self.fn, self.params, self.consts, self.free = None, {}, {}, {}


# --------------------------------------------------------------------------- op builders
#
# A builder gets (node, input shapes, attrs) and returns (fn, constants) where fn(F, xs, P, ctx)
# computes the node; P maps the node's local parameter names (``weight``, ``running_mean``)
# and its constants' names to arrays/symbols. Constants are numpy arrays made at build time.


def _pad4(F, x, t, b, l, r, value=0.0):
    return F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, t, b, l, r), constant_value=value)


def _conv(node, in_shapes):
    a = node.attrs
    t, b, l, r = a["pad"]
    sym = t == b and l == r
    kw = dict(kernel=tuple(a["kernel"]), stride=tuple(a["stride"]), dilate=tuple(a["dilation"]),
              pad=(t, l) if sym else (0, 0), num_filter=a["out_channels"], num_group=a["groups"],
              no_bias=not a["bias"], layout="NCHW")
    bias = a["bias"]

    def conv(F, xs, P, ctx):
        x = xs[0] if sym else _pad4(F, xs[0], t, b, l, r)
        if bias:
            return F.Convolution(x, P["weight"], P["bias"], **kw)
        return F.Convolution(x, P["weight"], **kw)

    return conv, {}


def _linear(node, in_shapes):
    a = node.attrs
    n, bias = a["out_features"], a["bias"]

    def linear(F, xs, P, ctx):
        if bias:
            return F.FullyConnected(xs[0], P["weight"], P["bias"], num_hidden=n, flatten=True)
        return F.FullyConnected(xs[0], P["weight"], num_hidden=n, no_bias=True, flatten=True)

    return linear, {}


def _batchnorm(node, in_shapes):
    a = node.attrs
    scale, center = a["scale"], a["center"]
    kw = dict(eps=a["eps"], momentum=1.0 - a["momentum"], fix_gamma=not scale, use_global_stats=False, axis=1)

    def bn(F, xs, P, ctx):
        mean, var = P["running_mean"], P["running_var"]
        gamma = P["weight"] if scale else F.ones_like(mean)
        beta = P["bias"] if center else F.zeros_like(mean)
        return F.BatchNorm(xs[0], gamma, beta, mean, var, **kw)

    return bn, {}


def _unary(f):
    return lambda node, in_shapes: ((lambda F, xs, P, ctx: f(F, xs[0], node.attrs)), {})


def _pool(kind):
    def build(node, in_shapes):
        a = node.attrs
        (kh, kw), (sh, sw) = a["kernel"], a["stride"]
        t, b, l, r = a["pad"]
        H, W = in_shapes[0][1:]
        Ho, Wo = node.shape[1:]
        sym = t == b and l == r
        if sym:
            ph, pw, eh, ew = t, l, H, W
        else:
            ph, pw, eh, ew = 0, 0, H + t + b, W + l + r  # explicit pad first
        valid = (_mx_pool_out(eh, kh, sh, ph, False), _mx_pool_out(ew, kw, sw, pw, False))
        full = (_mx_pool_out(eh, kh, sh, ph, True), _mx_pool_out(ew, kw, sw, pw, True))
        if valid == (Ho, Wo):
            convention, got = "valid", valid
        else:
            convention, got = "full", full
        if got[0] < Ho or got[1] < Wo:  # cannot happen (full >= ceil), but never silently
            raise UnsupportedError(f"mxnet backend: pooling {node.name}: MXNet gives {got}, IR wants {(Ho, Wo)}")
        cut = got != (Ho, Wo)
        native_avg = kind == "avg" and sym and not cut
        pool_type = kind if (kind == "max" or native_avg) else "sum"
        kwargs = dict(kernel=(kh, kw), stride=(sh, sw), pad=(ph, pw), pool_type=pool_type,
                      pooling_convention=convention)
        if pool_type == "avg":
            kwargs["count_include_pad"] = a["count_include_pad"]
        consts = {}
        divide = kind == "avg" and not native_avg
        if divide:
            div = avgpool_divisor((H, W), a, (Ho, Wo))  # cast to the build dtype with the other constants
            consts["divisor"] = div.reshape(1, 1, Ho, Wo)
        pad_value = -np.inf if kind == "max" else 0.0

        def pool(F, xs, P, ctx):
            x = xs[0] if sym else _pad4(F, xs[0], t, b, l, r, pad_value)
            y = F.Pooling(x, **kwargs)
            if cut:
                y = F.slice(y, begin=(None, None, 0, 0), end=(None, None, Ho, Wo))
            if divide:
                y = F.broadcast_div(y, P["divisor"])
            return y

        return pool, consts

    return build


def _adaptive(node, in_shapes):
    size = tuple(node.attrs["output_size"])
    if tuple(in_shapes[0][1:]) == size:
        return (lambda F, xs, P, ctx: xs[0]), {}
    return (lambda F, xs, P, ctx: F.contrib.AdaptiveAvgPooling2D(xs[0], output_size=size)), {}


def _dropout(node, in_shapes):
    rate = node.attrs["rate"]
    index = node.index

    def dropout(F, xs, P, ctx):
        if not rate:
            return xs[0]
        mask = ctx.masks.get(index) if ctx.masks else None
        if mask is not None:
            return F.broadcast_mul(xs[0], mask)  # mask already holds keep / (1 - rate)
        return F.Dropout(xs[0], p=rate)

    return dropout, {}


def _drop_path(node, in_shapes):
    rate = node.attrs["rate"]
    index = node.index
    axes = tuple(range(1, len(in_shapes[0]) + 1))

    def drop_path(F, xs, P, ctx):
        if not rate:
            return xs[0]
        mask = ctx.masks.get(index) if ctx.masks else None
        if mask is not None:
            return F.broadcast_mul(xs[0], mask)
        return F.Dropout(xs[0], p=rate, axes=axes)

    return drop_path, {}


def _lrn(node, in_shapes):
    a = node.attrs
    n, alpha, beta, k = a["size"], a["alpha"], a["beta"], a["k"]
    if n % 2 == 1:
        return (lambda F, xs, P, ctx: F.LRN(xs[0], alpha=alpha * n, beta=beta, knorm=k, nsize=n)), {}
    C, H, W = in_shapes[0]

    def lrn_even(F, xs, P, ctx):
        # sum of squares over channels [c - n//2, c + (n-1)//2], as a sum pooling over a
        # (channel, pixel) plane padded with zeros
        x = xs[0]
        sq = F.reshape(F.square(x), shape=(0, 1, C, H * W))
        sq = _pad4(F, sq, n // 2, (n - 1) // 2, 0, 0)
        s = F.Pooling(sq, kernel=(n, 1), stride=(1, 1), pool_type="sum")
        s = F.reshape(s, shape=(0, C, H, W))
        return x * ((s * alpha + k) ** (-beta))

    return lrn_even, {}


def _concat(node, in_shapes):
    return (lambda F, xs, P, ctx: F.concat(*xs, dim=1)), {}


def _add(node, in_shapes):
    def add(F, xs, P, ctx):
        if len(xs) == 2:
            return F.elemwise_add(xs[0], xs[1])
        return F.add_n(*xs)

    return add, {}


def _mul(node, in_shapes):
    same = tuple(in_shapes[0]) == tuple(in_shapes[1])
    if same:
        return (lambda F, xs, P, ctx: F.elemwise_mul(xs[0], xs[1])), {}
    return (lambda F, xs, P, ctx: F.broadcast_mul(xs[0], xs[1])), {}


def _shuffle(node, in_shapes):
    g = node.attrs["groups"]
    C, H, W = in_shapes[0]

    def shuffle(F, xs, P, ctx):
        x = F.reshape(xs[0], shape=(0, g, C // g, H, W))
        return F.reshape(F.swapaxes(x, 1, 2), shape=(0, C, H, W))

    return shuffle, {}


def _split(node, in_shapes):
    parts, index = node.attrs["parts"], node.attrs["index"]
    step = in_shapes[0][0] // parts
    begin, end = index * step, (index + 1) * step
    return (lambda F, xs, P, ctx: F.slice_axis(xs[0], axis=1, begin=begin, end=end)), {}


def _zeropad(node, in_shapes):
    t, b, l, r = node.attrs["pad"]
    return (lambda F, xs, P, ctx: _pad4(F, xs[0], t, b, l, r)), {}


def _hardsigmoid(F, x):
    return F.clip(x + 3.0, 0.0, 6.0) / 6.0


BUILDERS = {
    "conv2d": _conv,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "relu": _unary(lambda F, x, a: F.Activation(x, act_type="relu")),  # oneDNN-backed, unlike F.relu
    "relu6": _unary(lambda F, x, a: F.clip(x, 0.0, 6.0)),
    "leaky_relu": _unary(lambda F, x, a: F.LeakyReLU(x, act_type="leaky", slope=a["negative_slope"])),
    "sigmoid": _unary(lambda F, x, a: F.Activation(x, act_type="sigmoid")),
    "tanh": _unary(lambda F, x, a: F.Activation(x, act_type="tanh")),
    "hardswish": _unary(lambda F, x, a: x * _hardsigmoid(F, x)),
    "hardsigmoid": _unary(lambda F, x, a: _hardsigmoid(F, x)),
    "silu": _unary(lambda F, x, a: x * F.Activation(x, act_type="sigmoid")),
    "softmax": _unary(lambda F, x, a: F.softmax(x, axis=1)),
    "maxpool2d": _pool("max"),
    "avgpool2d": _pool("avg"),
    "adaptive_avgpool2d": _adaptive,
    "global_avgpool": _unary(lambda F, x, a: F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg")),
    "flatten": _unary(lambda F, x, a: F.Flatten(x)),
    "dropout": _dropout,
    "drop_path": _drop_path,
    "lrn": _lrn,
    "concat": _concat,
    "add": _add,
    "mul": _mul,
    "scale": _unary(lambda F, x, a: x * a["factor"]),
    "channel_shuffle": _shuffle,
    "channel_split": _split,
    "identity": _unary(lambda F, x, a: x),
    "zeropad2d": _zeropad,
}


# --------------------------------------------------------------------------- program


class _Program:
    """The IR compiled to node functions plus the Gluon Parameters they read.

    Attributes:
        params: Canonical parameter name -> gluon Parameter (the IR's parameter table).
        pdict: The gluon ParameterDict holding those and the graph's constants (divisor
            maps, gluon Constants, never counted as parameters).
        nodes: Compiled nodes in IR order (the input excluded).
        main, aux: Node index of the main output; (index, weight) of auxiliary outputs.
        mask_nodes: Indices of dropout / drop_path nodes (train graph inputs when masks are fixed).
    """

    def __init__(self, ir, ctx, dtype: str = "float32"):
        gluon = mx.gluon
        self.ir = ir
        self.pdict = gluon.ParameterDict(prefix="samenet_")
        index = {n.name: i for i, n in enumerate(ir.nodes)}
        self.params: dict[str, Any] = {}
        self.keys: dict[str, str] = {}  # canonical name -> block key
        self.nodes: list[_Node] = []
        used_keys: set[str] = set()

        def key_for(name):
            base = re.sub(r"[^0-9A-Za-z_]", "_", name)
            key, i = base, 1
            while key in used_keys:
                key, i = f"{base}_{i}", i + 1
            used_keys.add(key)
            return key

        for i, n in enumerate(ir.nodes):
            if n.op == "input":
                continue
            if n.op not in BUILDERS:
                raise UnsupportedError(f"mxnet backend: op {n.op} not implemented")
            in_shapes = [tuple(ir.node(s).shape) for s in n.inputs]
            node = _Node(i, n, tuple(index[s] for s in n.inputs))
            node.fn, consts = BUILDERS[n.op](node, in_shapes)
            for full in n.params:
                p = ir.params[full]
                key = key_for(full)
                param = self.pdict.get(key, shape=tuple(p.shape), dtype=dtype, init=mx.init.Zero(),
                                       grad_req="write" if p.trainable else "null",
                                       differentiable=p.trainable, allow_deferred_init=False)
                self.params[full] = param
                self.keys[full] = key
                node.params[p.local] = key
            for local, value in consts.items():
                key = key_for(f"{n.name}.{local}")
                self.pdict.get_constant(key, mx.nd.array(value, dtype=dtype))
                node.consts[local] = key
            self.nodes.append(node)
        self.pdict.initialize(ctx=ctx)
        self.main = index[ir.outputs[0].node]
        self.aux = [(index[o.node], o.weight) for o in ir.outputs[1:]]
        self.mask_nodes = [nd.index for nd in self.nodes if nd.op in ("dropout", "drop_path")]
        for train in (False, True):
            last = ir.last_use(train)
            for nd in self.nodes:
                nd.free[train] = tuple(j for j in dict.fromkeys(nd.inputs) if last.get(ir.nodes[j].name) == nd.index)


_Graph = None


def _define_graph():
    global _Graph
    if _Graph is not None:
        return

    class _Graph(mx.gluon.HybridBlock):  # noqa: N801
        """Interprets the program; eval graph -> main output, train graph -> (loss, main, *aux).

        Inputs: x, and for the train graph y (float class indices) then the fixed keep-masks
        (already scaled by 1 / (1 - rate)) of ``mask_nodes`` while masks are fixed.
        """

        def __init__(self, program: _Program, train: bool):
            super().__init__(prefix="samenet_", params=program.pdict)
            self._program = program
            self._train = train
            self._mask_order: list[int] = []
            self._plan = [nd for nd in program.nodes if train or not nd.train_only]
            for nd in self._plan:
                for key in (*nd.params.values(), *nd.consts.values()):
                    self._reg_params[key] = self.params.get(key)

        def set_mask_order(self, order: list[int]) -> None:
            if order != self._mask_order:
                self._mask_order = list(order)
                self._clear_cached_op()

        def hybrid_forward(self, F, x, *args, **P):
            prog, train = self._program, self._train
            if train:
                y, masks = args[0], args[1:]
                ctx = _Ctx(dict(zip(self._mask_order, masks)))
            else:
                ctx = _Ctx(None)
            vals: list = [None] * len(prog.ir.nodes)
            vals[0] = x
            for nd in self._plan:
                if not train and nd.op in TRAIN_ONLY_OPS:  # dropout, drop_path: identity in eval
                    vals[nd.index] = vals[nd.inputs[0]]
                else:
                    local = {k: P[v] for k, v in nd.params.items()}
                    for k, v in nd.consts.items():
                        local[k] = P[v]
                    vals[nd.index] = nd.fn(F, [vals[j] for j in nd.inputs], local, ctx)
                for j in nd.free[train]:
                    if j != nd.index:
                        vals[j] = None
            main = vals[prog.main]
            if main is x:  # a graph output must not be its input variable
                main = F.identity(main)
            if not train:
                return main
            loss = _cross_entropy(F, main, y)
            aux = [vals[j] for j, _ in prog.aux]
            for out, (_, w) in zip(aux, prog.aux):
                loss = loss + w * _cross_entropy(F, out, y)
            return (loss, main, *aux)


def _cross_entropy(F, logits, y):
    """Mean softmax cross-entropy from logits; y holds class indices (float)."""
    return -F.mean(F.pick(F.log_softmax(logits, axis=1), y, axis=1))


# --------------------------------------------------------------------------- backend


class MXNetBackend(Backend):
    """Apache MXNet 1.9 Gluon (``imperative`` by default; ``hybridized`` = static CachedOp)."""

    name = "mxnet"
    framework = "mxnet"
    distribution = "mxnet"
    exec_modes = ("imperative", "hybridized")
    known_gaps: dict[str, str] = {}
    verifies_fp64 = True
    bn_variance = "biased"  # CPU (and GPU without cuDNN); cuDNN's BN is unbiased (module docs)

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        """MXNet's CPU best practice (docs/faq/perf.md, docs/faq/env_var.md) for ``threads`` cores.

        OMP_NUM_THREADS sets the operators' OpenMP threads (MXNet's own default is half the
        cores); MXNET_CPU_WORKER_NTHREADS=1 (its default, stated for the record) keeps one
        engine worker, so operators run one after another, each on every core;
        MXNET_MKLDNN_ENABLED=1 keeps oneDNN on (the pip build's default, stated for the
        record). The docs' KMP_AFFINITY is left out: the pip wheel links GNU OpenMP, which
        ignores it. MXNET_SUBGRAPH_BACKEND stays unset: its fusions fold BN into convs for
        inference only, which would make train and infer cells different programs.
        """
        if not tuned:
            return {}
        return {**super().env_vars(threads, tuned), "MXNET_CPU_WORKER_NTHREADS": "1", "MXNET_MKLDNN_ENABLED": "1"}

    def import_framework(self) -> None:
        _import()
        _define_graph()

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
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError("mxnet backend: Ascend devices are not supported")
        if kind == "cuda":
            if not mx.runtime.Features().is_enabled("CUDA"):
                raise UnsupportedError("mxnet backend: this MXNet build has no CUDA (install mxnet-cuXXX)")
            if index >= self._num_gpus():
                raise UnsupportedError(f"mxnet backend: no GPU {index} here ({self._num_gpus()} found)")
            self.ctx = mx.gpu(index)
        else:
            self.ctx = mx.cpu()
        prec = config.precision
        if prec not in ("fp32", VERIFY_PRECISION) and not (prec == "tf32" and kind == "cuda"):
            raise UnsupportedError(f"mxnet backend: precision {prec} not implemented (fp32 only; tf32 on GPU)")
        self.dtype = storage_dtype(prec)
        if kind == "cuda" and prec == "fp32":
            # cuDNN/cuBLAS use TF32 on Ampere+ unless told not to; MXNet has no switch of its own
            os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
        self.config = config
        self.ir = ir
        config = self.resolve_config(config)
        self.hybridized = config.exec_mode == "hybridized"
        self.program = _Program(ir, self.ctx, self.dtype)
        self.eval_net = _Graph(self.program, train=False)
        self.train_net = _Graph(self.program, train=True)
        if self.hybridized:
            for net in (self.eval_net, self.train_net):
                net.hybridize(static_alloc=True, static_shape=True)
        self.trainable = {k: p for k, p in self.program.params.items() if p.grad_req != "null"}
        opt = config.optimizer
        self.trainer = None
        if self.trainable:
            self.trainer = mx.gluon.Trainer(
                list(self.trainable.values()), "sgd",
                {"learning_rate": opt.lr, "momentum": opt.momentum, "wd": opt.weight_decay, "rescale_grad": 1.0},
                kvstore=None, update_on_kvstore=False)
        self.masks: list = []
        self._dummy_y: dict[int, Any] = {}
        self._gpu_peak = 0.0

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
        if masks:
            for nd in self.program.nodes:
                if nd.op not in ("dropout", "drop_path") or nd.name not in masks:
                    continue
                rate = nd.attrs["rate"]
                if not rate:
                    continue
                m = np.asarray(masks[nd.name], dtype=self.dtype) / np.dtype(self.dtype).type(1.0 - rate)
                if nd.op == "drop_path":
                    m = m.reshape((-1,) + (1,) * len(nd.shape))
                self.masks.append(mx.nd.array(m, ctx=self.ctx, dtype=self.dtype))
                order.append(nd.index)
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
            self.trainer.step(1)
        return loss

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
