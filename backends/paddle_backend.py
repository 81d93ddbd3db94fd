"""PaddlePaddle backend: the IR as a paddle.nn.Layer, dynamic graph or paddle.jit.to_static.

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
      explicitly, sums (divisor_override=1) and divides by harness.ops.avgpool_divisor.
      ``exclusive`` is Paddle's name for count_include_pad=False.
    * BatchNorm: Paddle's momentum is the Keras one, 1 - the IR's; scale/center map to
      absent weight/bias (weight_attr=False semantics). Paddle keeps the running statistics
      as non-trainable parameters, so param_counts() reports (trainable, non-trainable) from
      Paddle's own parameter list. Paddle updates the running variance with the *biased*
      batch variance (measured, dynamic and static): bn_variance = "biased".
    * LRN: Paddle's local_response_norm divides alpha by the window size like PyTorch's, so
      it gets alpha * size.
    * hardsigmoid gets slope 1/6 exactly (Paddle's default is 0.1666667).
    * Train step: mean softmax cross-entropy (+ weighted aux heads), paddle.optimizer.Momentum
      with weight_decay=L2Decay (g + wd * w fused into the momentum update, every trainable
      parameter), v = m * v + g, w -= lr * v: the contract's form.
    * CPU: oneDNN (FLAGS_use_onednn / FLAGS_use_mkldnn) only changes kernels in static
      mode; Paddle 3's dynamic graph runs its native CPU kernels (MKL GEMM) either way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from harness.backend import VERIFY_PRECISION, Backend, BuildConfig, split_device, storage_dtype
from harness.errors import UnsupportedError
from harness.ops import avgpool_divisor

paddle = None
nn = None
F = None

DISTRIBUTIONS = ("paddlepaddle", "paddlepaddle-gpu", "paddlepaddle-cpu")
ONEDNN_FLAGS = ("FLAGS_use_onednn", "FLAGS_use_mkldnn")  # 3.x name first; older releases know the second only


def _import():
    global paddle, nn, F
    if paddle is None:
        import paddle as _paddle
        import paddle.nn as _nn
        import paddle.nn.functional as _F

        paddle, nn, F = _paddle, _nn, _F


def _known_flags(names) -> list[str]:
    out = []
    for name in names:
        try:
            paddle.get_flags([name])
            out.append(name)
        except (ValueError, RuntimeError):
            pass
    return out


# --------------------------------------------------------------------------- op layers

_Fn = _BatchNorm = _Dropout = _DropPath = _SumPool = _Pool = None  # defined once paddle is imported


def _define_layers():
    """Layer classes need paddle.nn at class-creation time."""
    global _Fn, _BatchNorm, _Dropout, _DropPath, _SumPool, _Pool
    if _Fn is not None:
        return

    class _Fn(nn.Layer):  # noqa: N801
        """A parameter-free op as a layer (one class, so static conversion sees plain calls)."""

        def __init__(self, kind, attrs=None):
            super().__init__()
            self.kind, self.a = kind, attrs or {}
            self.call = getattr(self, "_" + kind)

        def forward(self, *xs):
            return self.call(*xs)

        def _relu(self, x):
            return F.relu(x)

        def _relu6(self, x):
            return F.relu6(x)

        def _leaky_relu(self, x):
            return F.leaky_relu(x, self.a["negative_slope"])

        def _sigmoid(self, x):
            return F.sigmoid(x)

        def _tanh(self, x):
            return paddle.tanh(x)

        def _hardswish(self, x):
            return F.hardswish(x)

        def _hardsigmoid(self, x):
            return F.hardsigmoid(x, slope=1.0 / 6.0, offset=0.5)

        def _silu(self, x):
            return F.silu(x)

        def _softmax(self, x):
            return F.softmax(x, axis=1)

        def _global_avgpool(self, x):
            return F.adaptive_avg_pool2d(x, 1)

        def _adaptive_avgpool2d(self, x):
            return F.adaptive_avg_pool2d(x, self.a["output_size"])

        def _flatten(self, x):
            return paddle.flatten(x, 1)

        def _lrn(self, x):
            a = self.a
            return F.local_response_norm(x, a["size"], a["alpha"] * a["size"], a["beta"], a["k"])

        def _concat(self, *xs):
            return paddle.concat(list(xs), axis=1)

        def _add(self, *xs):
            out = xs[0] + xs[1]
            for x in xs[2:]:
                out = out + x
            return out

        def _mul(self, x, y):
            return x * y

        def _scale(self, x):
            return paddle.scale(x, self.a["factor"])

        def _channel_shuffle(self, x):
            return F.channel_shuffle(x, self.a["groups"])

        def _channel_split(self, x):
            step = x.shape[1] // self.a["parts"]
            i = self.a["index"]
            return x[:, i * step:(i + 1) * step]

        def _identity(self, x):
            return x

        def _zeropad2d(self, x):
            t, b, l, r = self.a["pad"]
            return F.pad(x, [l, r, t, b], data_format="NCHW")

    class _Pool(nn.Layer):  # noqa: N801
        """Native max/avg pooling, cut to the IR's output size where Paddle keeps more."""

        def __init__(self, kind, kernel, stride, padding, ceil, exclusive, cut):
            super().__init__()
            self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding
            self.ceil, self.exclusive, self.cut = ceil, exclusive, cut

        def forward(self, x):
            if self.kind == "max":
                y = F.max_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil)
            else:
                y = F.avg_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil,
                                 exclusive=self.exclusive)
            if self.cut is not None:
                y = y[:, :, : self.cut[0], : self.cut[1]]
            return y

    class _SumPool(nn.Layer):  # noqa: N801
        """Average pooling via explicit pads, window sums and the IR's divisor map."""

        def __init__(self, a, in_hw, out_hw):
            super().__init__()
            t, b, l, r = a["pad"]
            (kh, kw), (sh, sw) = a["kernel"], a["stride"]
            H, W = in_hw
            extra_h = max((out_hw[0] - 1) * sh + kh - (H + t + b), 0)
            extra_w = max((out_hw[1] - 1) * sw + kw - (W + l + r), 0)
            self.pad = [l, r + extra_w, t, b + extra_h]
            self.kernel, self.stride, self.out_hw = (kh, kw), (sh, sw), tuple(out_hw)
            ho = (H + t + b + extra_h - kh) // sh + 1
            wo = (W + l + r + extra_w - kw) // sw + 1
            self.cut = None if (ho, wo) == self.out_hw else self.out_hw
            div = avgpool_divisor(in_hw, a, out_hw).astype(paddle.get_default_dtype())
            self.register_buffer("divisor", paddle.to_tensor(div), persistable=False)

        def forward(self, x):
            x = F.pad(x, self.pad, data_format="NCHW")
            s = F.avg_pool2d(x, self.kernel, self.stride, 0, ceil_mode=False, exclusive=False, divisor_override=1)
            if self.cut is not None:
                s = s[:, :, : self.cut[0], : self.cut[1]]
            return s / self.divisor

    class _BatchNorm(nn.Layer):  # noqa: N801
        """paddle's fused batch_norm with only the parameters the IR declares."""

        def __init__(self, c, a, rank):
            super().__init__()
            init = nn.initializer.Constant
            self.weight = (self.create_parameter([c], default_initializer=init(1.0)) if a["scale"] else None)
            self.bias = (self.create_parameter([c], is_bias=True, default_initializer=init(0.0))
                         if a["center"] else None)
            self._mean = self.create_parameter(
                [c], attr=paddle.ParamAttr(initializer=init(0.0), trainable=False))
            self._variance = self.create_parameter(
                [c], attr=paddle.ParamAttr(initializer=init(1.0), trainable=False))
            self._mean.stop_gradient = True
            self._variance.stop_gradient = True
            self.momentum = 1.0 - a["momentum"]  # Paddle's (Keras) sense
            self.eps = a["eps"]
            self.fmt = "NCHW" if rank == 3 else "NC"
            # A missing scale or shift is a constant stand-in (a buffer, not a parameter).
            # Paddle 3.3's batch_norm backward gives the scale and the shift a gradient only
            # when both require one (measured: a lone beta or gamma never trains), and its
            # oneDNN kernel (static inference) crashes without them: stand-ins beside a real
            # parameter therefore require a gradient (cleared after each step).
            self.standins = []
            needs_grad = a["scale"] or a["center"]
            if not a["scale"]:
                self.register_buffer("ones", paddle.ones([c]), persistable=False)
                self.ones.stop_gradient = not needs_grad
                self.standins.append(self.ones)
            if not a["center"]:
                self.register_buffer("zeros", paddle.zeros([c]), persistable=False)
                self.zeros.stop_gradient = not needs_grad
                self.standins.append(self.zeros)
            if not needs_grad:
                self.standins = []

        def forward(self, x):
            w = self.ones if self.weight is None else self.weight
            b = self.zeros if self.bias is None else self.bias
            return F.batch_norm(x, self._mean, self._variance, w, b, training=self.training,
                                momentum=self.momentum, epsilon=self.eps, data_format=self.fmt)

        def params(self):
            p = {"running_mean": self._mean, "running_var": self._variance}
            if self.weight is not None:
                p["weight"] = self.weight
            if self.bias is not None:
                p["bias"] = self.bias
            return p

    class _Dropout(nn.Layer):  # noqa: N801
        """Inverted dropout; a fixed keep-mask (a buffer) can be set for parity runs."""

        def __init__(self, rate):
            super().__init__()
            self.rate = rate
            self.register_buffer("mask", None, persistable=False)

        def forward(self, x):
            if not self.training or not self.rate:
                return x
            if self.mask is not None:
                return x * self.mask / (1.0 - self.rate)
            return F.dropout(x, self.rate, training=True)

    class _DropPath(_Dropout):  # noqa: N801
        """Stochastic depth, one keep decision per sample (torchvision's "row" mode)."""

        def forward(self, x):
            if not self.training or not self.rate:
                return x
            if self.mask is not None:
                return x * self.mask / (1.0 - self.rate)
            # dropout of a ones tensor of shape (N, 1, ...): keep / (1 - rate) per sample
            one = x[:, :1, :1, :1] if len(x.shape) == 4 else x[:, :1]
            return x * F.dropout(paddle.ones_like(one), self.rate, training=True)


# --------------------------------------------------------------------------- builders


def _paddle_pool_out(n, k, s, p0, p1, ceil):
    """Paddle's own pooling output size (no PyTorch correction for windows in the pad)."""
    span = n + p0 + p1 - k
    return (-(-span // s) if ceil else span // s) + 1


def _build_conv(node, in_shapes):
    a = node.attrs
    t, b, l, r = a["pad"]
    padding = [t, l] if (t == b and l == r) else [t, b, l, r]
    conv = nn.Conv2D(in_shapes[0][0], a["out_channels"], list(a["kernel"]), list(a["stride"]), padding,
                     list(a["dilation"]), a["groups"], bias_attr=None if a["bias"] else False)
    params = {"weight": (conv.weight, False)}
    if a["bias"]:
        params["bias"] = (conv.bias, False)
    return conv, params


def _build_linear(node, in_shapes):
    a = node.attrs
    lin = nn.Linear(in_shapes[0][0], a["out_features"], bias_attr=None if a["bias"] else False)
    params = {"weight": (lin.weight, True)}  # Paddle keeps (in, out): transposed
    if a["bias"]:
        params["bias"] = (lin.bias, False)
    return lin, params


def _build_bn(node, in_shapes):
    m = _BatchNorm(in_shapes[0][0], node.attrs, len(in_shapes[0]))
    return m, {k: (v, False) for k, v in m.params().items()}


def _build_pool(node, in_shapes, kind):
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    H, W = in_shapes[0][1:]
    Ho, Wo = node.shape[1:]
    sym = t == b and l == r
    padding = [t, l] if sym else [t, b, l, r]
    if kind == "avg":
        # native only without any window past the pads, with symmetric pads: then Paddle's
        # divisor (all of the window, or its part inside the input) is the IR's
        full = ((Ho - 1) * sh + kh <= H + t + b) and ((Wo - 1) * sw + kw <= W + l + r)
        if not (sym and full):
            return _SumPool(a, (H, W), (Ho, Wo)), {}
        ceil = False
        out = (_paddle_pool_out(H, kh, sh, t, b, False), _paddle_pool_out(W, kw, sw, l, r, False))
    else:
        ceil = a["ceil_mode"]
        out = (_paddle_pool_out(H, kh, sh, t, b, ceil), _paddle_pool_out(W, kw, sw, l, r, ceil))
    if out[0] < Ho or out[1] < Wo:
        raise UnsupportedError(f"paddle backend: {node.name}: pooling output {out} smaller than the IR's {(Ho, Wo)}")
    cut = None if out == (Ho, Wo) else (Ho, Wo)
    return _Pool(kind, [kh, kw], [sh, sw], padding, ceil, not a.get("count_include_pad", True), cut), {}


def _fn(node, in_shapes):
    return _Fn(node.op, node.attrs), {}


BUILDERS = {
    "conv2d": _build_conv,
    "linear": _build_linear,
    "batchnorm": _build_bn,
    "maxpool2d": lambda n, s: _build_pool(n, s, "max"),
    "avgpool2d": lambda n, s: _build_pool(n, s, "avg"),
    "dropout": lambda n, s: (_Dropout(n.attrs["rate"]), {}),
    "drop_path": lambda n, s: (_DropPath(n.attrs["rate"]), {}),
    **{op: _fn for op in ("relu", "relu6", "leaky_relu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "silu",
                          "softmax", "adaptive_avgpool2d", "global_avgpool", "flatten", "lrn", "concat", "add",
                          "mul", "scale", "channel_shuffle", "channel_split", "identity", "zeropad2d")},
}


def _graph_layer_class():
    class GraphLayer(nn.Layer):
        """Runs the IR's nodes in order; intermediates are released after their last use."""

        def __init__(self, ir):
            super().__init__()
            self.layers = nn.LayerList()
            self.canonical: dict[str, tuple[Any, bool]] = {}  # name -> (tensor, transposed)
            self.node_layers: dict[str, Any] = {}
            index = {n.name: i for i, n in enumerate(ir.nodes)}
            slots: list = [None] * len(ir.nodes)
            for i, n in enumerate(ir.nodes):
                if n.op == "input":
                    continue
                if n.op not in BUILDERS:
                    raise UnsupportedError(f"paddle backend: op {n.op} not implemented")
                layer, params = BUILDERS[n.op](n, [ir.node(s).shape for s in n.inputs])
                slots[i] = len(self.layers)
                self.layers.append(layer)
                self.node_layers[n.name] = layer
                for local, entry in params.items():
                    self.canonical[f"{n.name}.{local}"] = entry
            self._slots = slots
            object.__setattr__(self, "_calls", list(self.layers))  # plain list: no LayerList lookup per node
            self.standins = [t for layer in self.layers for t in getattr(layer, "standins", ())]
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
                plan.append((i, self._slots[i], tuple(index[s] for s in n.inputs), free))
            return plan

        def forward(self, x):
            return self.run(x)

        def run(self, x):
            train = self.training
            vals: list = [None] * len(self._slots)
            vals[0] = x
            calls = self._calls
            for i, slot, ins, free in self.plans[train]:
                vals[i] = calls[slot](*[vals[j] for j in ins])
                for j in free:
                    vals[j] = None
            outs = [vals[self.main], *[vals[j] for j, _ in self.aux]] if train and self.aux else [vals[self.main]]
            if not paddle.in_dynamic_mode():
                # Paddle 3.3 with oneDNN on: a static program whose output comes straight
                # from a oneDNN kernel (conv, pool, matmul) fails or crashes in run_program
                # ("dst_tensor shall be defined", or SIGSEGV); a copy makes a plain output
                outs = [paddle.assign(o) for o in outs]
            return tuple(outs) if len(outs) > 1 else outs[0]

    # The static conversion should trace run() as plain Python (nothing in it depends on a
    # tensor's value), not rewrite its loops.
    GraphLayer.run = paddle.jit.not_to_static(GraphLayer.run)
    return GraphLayer


# --------------------------------------------------------------------------- backend


class PaddleBackend(Backend):
    """PaddlePaddle (dynamic graph by default; ``static`` = paddle.jit.to_static, conversion in
    the first step)."""

    name = "paddle"
    framework = "paddle"
    distribution = "paddlepaddle"
    exec_modes = ("dynamic", "static")
    options: dict[str, tuple[str, ...]] = {}
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"
    verifies_fp64 = True

    # ------------------------------------------------------------------ no framework needed

    @classmethod
    def installed_version(cls) -> str | None:
        from importlib import metadata

        for dist in DISTRIBUTIONS:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        """Tuned: the core budget for OpenMP/MKL and oneDNN on (Paddle's FLAGS_use_onednn, and
        FLAGS_use_mkldnn, its name before 3.x); stock: Paddle's defaults (nothing set)."""
        if not tuned:
            return {}
        return {**super().env_vars(threads, tuned), "FLAGS_use_onednn": "1", "FLAGS_use_mkldnn": "1"}

    # ------------------------------------------------------------------ framework calls

    def import_framework(self) -> None:
        _import()
        _define_layers()

    def version(self) -> str:
        return paddle.__version__

    def devices(self) -> list[str]:
        out = ["cpu"]
        if paddle.device.is_compiled_with_cuda():
            out += [f"cuda:{i}" for i in range(paddle.device.cuda.device_count())]
        return out

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        core = paddle.base.core
        flags = _known_flags(ONEDNN_FLAGS)
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
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError("paddle backend: Ascend devices are not supported")
        if kind == "cuda":
            if not paddle.device.is_compiled_with_cuda():
                raise UnsupportedError("paddle backend: this paddle is a CPU build (install paddlepaddle-gpu for CUDA)")
            if index >= paddle.device.cuda.device_count():
                raise UnsupportedError(f"paddle backend: no CUDA device {index} here")
            self.place = f"gpu:{index}"
        else:
            self.place = "cpu"
        prec = config.precision
        self.np_dtype = np.dtype(storage_dtype(prec)).type
        if kind == "cpu" and prec not in ("fp32", VERIFY_PRECISION):
            raise UnsupportedError(f"paddle backend: precision {prec} is supported on CUDA only")
        if kind == "cuda":
            # Paddle allows TF32 by default on Ampere+; fp32 means true fp32
            if prec != "tf32":
                os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
            paddle.base.core.set_cublas_switch(prec == "tf32")
        self.amp_dtype = {"amp-bf16": "bfloat16", "amp-fp16": "float16"}.get(prec)
        paddle.set_device(self.place)
        self.config = config
        self.ir = ir
        self.exec_mode = config.exec_mode or self.exec_modes[0]
        previous = paddle.get_default_dtype()
        paddle.set_default_dtype(np.dtype(self.np_dtype).name)  # parameters and buffers
        try:
            self.module = _graph_layer_class()(ir)
        finally:
            paddle.set_default_dtype(previous)
        self._train = None
        self._onednn_flags = _known_flags(ONEDNN_FLAGS)
        self.model = self._convert() if self.exec_mode == "static" else self.module
        params = [p for p in self.module.parameters() if not p.stop_gradient]
        opt = config.optimizer
        self.optimizer = paddle.optimizer.Momentum(
            learning_rate=opt.lr, momentum=opt.momentum, parameters=params, use_nesterov=False,
            weight_decay=paddle.regularizer.L2Decay(opt.weight_decay) if opt.weight_decay else None,
        ) if params else None
        self.scaler = paddle.amp.GradScaler() if prec == "amp-fp16" else None

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
        layers = [(name, layer) for name, layer in self.module.node_layers.items() if isinstance(layer, _Dropout)]
        for name, layer in layers:
            m = masks.get(name) if masks else None
            if m is not None:
                m = np.asarray(m, self.np_dtype)
                if isinstance(layer, _DropPath):
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
        outs = out if isinstance(out, (tuple, list)) else (out,)
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
        outs = out if isinstance(out, (tuple, list)) else (out,)
        y_col = y.unsqueeze(1)
        loss = self._cross_entropy(outs[0], y_col)
        for o, (_, w) in zip(outs[1:], self.module.aux):
            loss = loss + w * self._cross_entropy(o, y_col)
        return loss

    def train_step(self, batch):
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
        if self.place != "cpu":
            paddle.device.synchronize(self.place)

    def memory_stats(self) -> dict[str, float]:
        if self.place == "cpu":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": paddle.device.cuda.max_memory_allocated(self.place) / mb,
                "reserved_peak_mb": paddle.device.cuda.max_memory_reserved(self.place) / mb}
