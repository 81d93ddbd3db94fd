"""MindSpore backend: the IR as generated straight-line Cells, PyNative or graph (ms.jit), CPU/GPU/Ascend.

How the IR becomes a MindSpore model:
    * One Cell per node with parameters or state (nn.Conv2d, nn.Dense, BatchNorm, pooling,
      LRN, dropout); parameter-free nodes are inlined as ``ops`` calls.
    * The network's ``construct`` (eval) and ``forward_train`` (train: BN batch statistics,
      dropout on, auxiliary heads returned) are generated as straight-line Python source,
      one statement per node, written to a file in a per-process temp directory and
      imported as a module: MindSpore's graph compiler parses source (it cannot compile an
      interpreter loop over a node list), and PyNative runs the same code with no
      per-node bookkeeping. Intermediate values share a few local names, reassigned once
      a value is dead, so PyNative frees activations as early as the torch backend does.
    * ``graph`` wraps the eval Cell and the training Cell (nn.TrainOneStepCell) in ms.jit:
      the first step compiles. ``pynative`` (the default) calls them directly.

Conventions handled here (see harness/ops.py for the canonical ones):
    * Layouts are MindSpore's own (Conv2d OIHW, Dense (out, in)): weights load as they are.
    * Conv2d: pad_mode="valid" or "same" where those give the IR's pads exactly (faster to
      dispatch in PyNative), else "pad" with padding=(top, bottom, left, right), MindSpore's
      order (checked against the reference with asymmetric pads).
    * Pooling: explicit pads (-inf for max, 0 for average) of the IR's pads plus any
      ceil-mode overhang, then the native VALID pooling, so the output is the IR's size.
      Max pools concatenate freshly filled -inf borders (no view tensors: see _MaxPool),
      except graph-mode training, which keeps nn.MaxPool2d(pad_mode="pad") where it applies.
      Average pooling then multiplies by kh*kw / divisor (harness.ops.avgpool_divisor)
      where that map is not all ones (count_include_pad=False or ceil overhang).
    * BatchNorm: the ops.BatchNorm primitive that nn.BatchNorm2d uses. The primitive takes
      PyTorch-sense momentum (nn.BatchNorm2d's Keras-sense ``momentum`` is turned into
      ``1 - momentum`` before it reaches the primitive), so it gets the IR's momentum as
      is; it updates the running variance with the unbiased batch variance (measured),
      so ``bn_variance`` is "unbiased". scale/center off: a constant ones/zeros tensor.
    * LRN: the op table's formula, the channel-window sum of squares as an (n, 1) average pool
      over (N, 1, C + n - 1, H*W) (window [c - floor(n/2), c + ceil(n/2) - 1], any n). Not
      ops.LRN: TF-like (odd n only) and its CPU kernel fails for many shapes.
    * adaptive_avgpool2d: identity, an exact VALID average pool when the sizes divide,
      else two matmuls with harness.ops.adaptive_pool_matrix.
    * Train step: nn.TrainOneStepCell + nn.Momentum. Momentum is PyTorch's form (ApplyMomentum:
      v = m*v + g; w -= lr*v). MindSpore skips weight decay for parameters named *beta* or
      *gamma* unless parameters are grouped: one group with the weight decay applies it to
      every trainable parameter, as the contract says.
    * MindSpore litter: glog is quieted (GLOG_v=3 unless set), analyze_fail.ir dumps go to
      MS_OM_PATH (a temp directory unless set), generated sources live in a temp directory
      removed at exit; nothing is written to the working directory.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import sys
import tempfile
import types
from typing import Any

import numpy as np

from harness.backend import Backend, BuildConfig, split_device
from harness.errors import UnsupportedError
from harness.ops import adaptive_pool_matrix, avgpool_divisor, resolve_pads

ms = None
nn = None
ops = None
Tensor = None
Parameter = None

TARGETS = {"cpu": "CPU", "cuda": "GPU", "ascend": "Ascend"}
TUNED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
"""MindSpore 2.10 runs CPU convolutions in plain NCHW; on AVX-512 CPUs oneDNN then picks
``jit_uni_ncsp:conv+ref:any``, a reference kernel about 70x slower than its AVX2 im2col+GEMM
(measured: 64->64 3x3 conv on 16x64x56x56, 25 s vs 0.33 s). Capping oneDNN's ISA at AVX2
restores the GEMM kernels; a no-op on CPUs without AVX-512."""
_GEN_DIR: str | None = None
_GEN_COUNT = itertools.count()


def _quiet_env() -> None:
    """MindSpore's logging and dump locations, set before it is imported (user values win)."""
    os.environ.setdefault("GLOG_v", "3")  # errors only (MindSpore's default 2 prints warnings)
    os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "samenet-mindspore-om"))


def _import():
    global ms, nn, ops, Tensor, Parameter
    if ms is None:
        _quiet_env()
        import mindspore as _ms
        import mindspore.nn as _nn
        import mindspore.ops as _ops

        ms, nn, ops, Tensor, Parameter = _ms, _nn, _ops, _ms.Tensor, _ms.Parameter


def _gen_dir() -> str:
    global _GEN_DIR
    if _GEN_DIR is None:
        _GEN_DIR = tempfile.mkdtemp(prefix="samenet-mindspore-gen-")
        atexit.register(shutil.rmtree, _GEN_DIR, True)
    return _GEN_DIR


def _f32(a) -> np.ndarray:
    """A private float32 copy (a MindSpore Tensor may share a numpy array's memory)."""
    return np.array(a, dtype=np.float32, copy=True, order="C")


# --------------------------------------------------------------------------- cells

_BatchNorm = _MaxPool = _AvgPool = _ZeroPad = _Adaptive = _LRN = _Dropout = _DropPath = None
_Fn = _TrainLoss = None


def _shuffle(x, g):
    """ShuffleNet channel shuffle (also parsed by the graph compiler)."""
    n, c, h, w = x.shape
    return ops.reshape(ops.transpose(ops.reshape(x, (n, g, c // g, h, w)), (0, 2, 1, 3, 4)), (n, c, h, w))


def _define_cells():
    """Cell classes need mindspore.nn at class-creation time."""
    global _BatchNorm, _MaxPool, _AvgPool, _ZeroPad, _Adaptive, _LRN, _Dropout, _DropPath, _Fn, _TrainLoss
    if _BatchNorm is not None:
        return

    class _BatchNorm(nn.Cell):  # noqa: N801
        """BatchNorm over axis 1 of (N, C, H, W) or (N, F); the primitive nn.BatchNorm2d uses."""

        def __init__(self, c, a):
            super().__init__()
            ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
            self.weight = Parameter(Tensor(ones), name="weight") if a["scale"] else Tensor(ones)
            self.bias = Parameter(Tensor(zeros), name="bias") if a["center"] else Tensor(zeros)
            self.running_mean = Parameter(Tensor(zeros.copy()), name="running_mean", requires_grad=False)
            self.running_var = Parameter(Tensor(ones.copy()), name="running_var", requires_grad=False)
            # The primitive's momentum is PyTorch's: running = (1 - m) * running + m * batch.
            self.bn_train = ops.BatchNorm(is_training=True, epsilon=a["eps"], momentum=a["momentum"])
            self.bn_infer = ops.BatchNorm(is_training=False, epsilon=a["eps"])
            self.params = {"running_mean": self.running_mean, "running_var": self.running_var}
            if a["scale"]:
                self.params["weight"] = self.weight
            if a["center"]:
                self.params["bias"] = self.bias

        def construct(self, x, train):
            if train:
                return self.bn_train(x, self.weight, self.bias, self.running_mean, self.running_var)[0]
            return self.bn_infer(x, self.weight, self.bias, self.running_mean, self.running_var)[0]

    class _MaxPool(nn.Cell):  # noqa: N801
        """Max pooling with the IR's pads (plus any ceil overhang) as -inf, then VALID pooling.

        The -inf borders are filled afresh each call (ops.full) and concatenated to the input,
        so no tensor in the pool's forward or backward is a view. In PyNative a view input
        (broadcast_to, or the unsqueeze/squeeze inside nn.MaxPool2d(pad_mode="pad"), which
        runs MaxPool3DWithArgmax) makes MindSpore copy it to contiguous memory first, and that
        copy busy-waits on the main thread until the queued kernels finish, taking a core
        from them (ResNet-50 training, batch 16, 2 threads, 3 fresh processes each: 5152 ms
        a step with nn.MaxPool2d(pad_mode="pad"), 4757 ms this way, 4525 ms for a hand-written
        net's SAME pool; main thread 1265-1756 against 967-1235 ms of CPU a step).
        Not ops.Pad plus a -inf border (3.5x the pool itself: MindSpore's CPU Pad kernel), nor
        ops.pad (PadV3), whose backward is wrong in graph mode from the second step on
        (MindSpore 2.10, CPU), nor ops.MaxPoolWithArgmaxV2 (exact, but 10x the whole step on
        the CPU), nor ops.MaxPool3D on an expanded input (views again: 5130 ms), nor (stem pool,
        forward plus backward, against 246-272 ms this way) a stride-1 SAME pool then a 1x1
        stride-2 pool (exact, 864-894 ms) or ops.flip around a SAME pool (550-600 ms).

        Graph mode has no such waits, so there training keeps nn.MaxPool2d(pad_mode="pad")
        wherever it applies (symmetric pads of at most half the kernel): its forward plus
        backward is the faster one (ResNet-50's stem: 226 against 447 ms; the whole training
        step 6240 ms with the concatenated pads against 5900 ms for the hand-written net).
        """

        def __init__(self, kernel, stride, pad, in_shape, graph):
            super().__init__()
            l, r, t, b = pad
            H, W = in_shape[1:]
            self.use_pad = any(pad)
            self.native = graph and self.use_pad and t == b and l == r and 2 * t <= kernel[0] and 2 * l <= kernel[1]
            if self.native:
                self.native_pool = nn.MaxPool2d(tuple(kernel), tuple(stride), pad_mode="pad", padding=(t, l))
            # Bottom and right pads past the last window are never read (ResNet's stem pool, pad 1
            # on 112: the last window ends on row 111); not concatenating them saves two copies
            # of the map (stem pool forward 116 against 154 ms).
            (kh, kw), (sh, sw) = kernel, stride
            b = min(b, max((H + t + b - kh) // sh * sh + kh - H - t, 0))
            r = min(r, max((W + l + r - kw) // sw * sw + kw - W - l, 0))
            self.sides = (t, b, l, r)
            self.pool = ops.MaxPool(kernel_size=tuple(kernel), strides=tuple(stride), pad_mode="VALID")

        def construct(self, x, train):
            if not self.use_pad:
                return self.pool(x)
            if train and self.native:
                return self.native_pool(x)
            t, b, l, r = self.sides
            n, c, h, w = x.shape
            ninf = float("-inf")
            if t:
                x = ops.concat((ops.full((n, c, t, w), ninf, dtype=x.dtype), x), 2)
            if b:
                x = ops.concat((x, ops.full((n, c, b, w), ninf, dtype=x.dtype)), 2)
            if l:
                x = ops.concat((ops.full((n, c, h + t + b, l), ninf, dtype=x.dtype), x), 3)
            if r:
                x = ops.concat((x, ops.full((n, c, h + t + b, r), ninf, dtype=x.dtype)), 3)
            return self.pool(x)

    class _AvgPool(nn.Cell):  # noqa: N801
        """Zero pads (IR pads plus ceil overhang), VALID average pooling, IR divisor."""

        def __init__(self, kernel, stride, pad, factor):
            super().__init__()
            l, r, t, b = pad
            self.use_pad = any(pad)
            self.pad = ops.Pad(((0, 0), (0, 0), (t, b), (l, r)))
            self.pool = ops.AvgPool(kernel_size=tuple(kernel), strides=tuple(stride), pad_mode="VALID")
            self.use_factor = factor is not None
            self.factor = Tensor(factor) if factor is not None else None

        def construct(self, x):
            if self.use_pad:
                x = self.pad(x)
            y = self.pool(x)
            if self.use_factor:
                y = y * self.factor
            return y

    class _ZeroPad(nn.Cell):  # noqa: N801
        """zeropad2d with ops.Pad (not ops.pad: see _MaxPool)."""

        def __init__(self, pad):
            super().__init__()
            t, b, l, r = pad
            self.pad = ops.Pad(((0, 0), (0, 0), (t, b), (l, r)))

        def construct(self, x):
            return self.pad(x)

    class _Adaptive(nn.Cell):  # noqa: N801
        """PyTorch's adaptive average pooling as mh @ x @ mw^T (exact bins)."""

        def __init__(self, mh, mwt):
            super().__init__()
            self.mh, self.mwt = Tensor(mh), Tensor(mwt)

        def construct(self, x):
            return ops.matmul(ops.matmul(self.mh, x), self.mwt)

    class _LRN(nn.Cell):  # noqa: N801
        """The op table's LRN: the channel-window sum of squares as an (n, 1) average pool.

        ops.LRN (TF-like) is not used: its CPU kernel fails ("could not execute a primitive")
        for many shapes (e.g. (2, 96, 55, 55)), and it cannot express even sizes.
        """

        def __init__(self, a):
            super().__init__()
            n = a["size"]
            self.k, self.beta = a["k"], a["beta"]
            self.alpha_n = a["alpha"] * n  # the pool averages: alpha * sum = alpha * n * mean
            self.chan_pad = ops.Pad(((0, 0), (0, 0), (n // 2, (n - 1) // 2), (0, 0)))
            self.pool = ops.AvgPool(kernel_size=(n, 1), strides=1, pad_mode="VALID")

        def construct(self, x):
            n, c, h, w = x.shape
            sq = self.chan_pad(ops.reshape(x * x, (n, 1, c, h * w)))
            s = ops.reshape(self.pool(sq), (n, c, h, w))
            return x * ops.pow(s * self.alpha_n + self.k, -self.beta)

    class _Dropout(nn.Cell):  # noqa: N801
        """Inverted dropout, train mode only (eval is the identity); fixed keep-mask optional."""

        def __init__(self, rate, rank):
            super().__init__()
            self.rate, self.keep = rate, 1.0 - rate
            self.active = bool(rate)
            self.mask = None
            self.tail = (1,) * rank

        def construct(self, x):
            if not self.active:
                return x
            if self.mask is None:
                return ops.dropout(x, p=self.rate, training=True)
            return x * self.mask / self.keep

    class _DropPath(_Dropout):  # noqa: N801
        """Stochastic depth: one keep decision per sample."""

        def construct(self, x):
            if not self.active:
                return x
            if self.mask is None:
                # dropout of a ones (N, 1, ...) tensor: keep / (1 - rate) per sample
                return x * ops.dropout(ops.ones((x.shape[0],) + self.tail, x.dtype), p=self.rate, training=True)
            return x * self.mask / self.keep

    class _Fn(nn.Cell):  # noqa: N801
        """Calls one method of the network (ms.jit compiles Cells)."""

        def __init__(self, net, method):
            super().__init__(auto_prefix=False)
            self.net = net
            self.method = method

        def construct(self, x):
            if self.method == "train":
                return self.net.forward_train(x)
            return self.net(x)

    class _TrainLoss(nn.Cell):  # noqa: N801
        def __init__(self, net):
            super().__init__(auto_prefix=False)
            self.net = net

        def construct(self, x, y):
            return self.net.train_loss(x, y)


# --------------------------------------------------------------------------- op emitters


def _pool_geometry(node, in_shape):
    """ops.pad tuple (left, right+ow, top, bottom+oh) covering the IR's pads and ceil overhang."""
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    H, W = in_shape[1:]
    Ho, Wo = node.shape[1:]
    extra_h = max((Ho - 1) * sh + kh - (H + t + b), 0)
    extra_w = max((Wo - 1) * sw + kw - (W + l + r), 0)
    return (l, r + extra_w, t, b + extra_h)


def _cell_pool(node, in_shapes, kind, graph=False):
    a = node.attrs
    pad = _pool_geometry(node, in_shapes[0])
    if kind == "max":
        return _MaxPool(a["kernel"], a["stride"], pad, in_shapes[0], graph)
    div = avgpool_divisor(in_shapes[0][1:], a, node.shape[1:])
    factor = a["kernel"][0] * a["kernel"][1] / div
    factor = None if np.all(factor == 1.0) else factor.astype(np.float32)[None, None]
    return _AvgPool(a["kernel"], a["stride"], pad, factor)


def _cell_adaptive(node, in_shapes):
    H, W = in_shapes[0][1:]
    ho, wo = node.attrs["output_size"]
    if (H, W) == (ho, wo):
        return None
    if H % ho == 0 and W % wo == 0:  # equal, disjoint bins: a plain average pool
        k = (H // ho, W // wo)
        return _AvgPool(k, k, (0, 0, 0, 0), None)
    mh = adaptive_pool_matrix(H, ho).astype(np.float32)
    mwt = adaptive_pool_matrix(W, wo).T.astype(np.float32).copy()
    return _Adaptive(mh, mwt)


def _conv_padding(a, in_shape):
    """nn.Conv2d's pad_mode and padding for the IR's pads (t, b, l, r).

    "valid" and "same" where they give the IR's pads exactly, "pad" otherwise: PyNative
    dispatches a "pad" convolution more slowly (ResNet-50 at 32x32, batch 1: 0.85 against
    0.5 ms per Conv2D; a 3x3 64-channel conv at 56x56, batch 16: 66.9 against 63.5 ms).
    """
    pads = tuple(a["pad"])
    if not any(pads):
        return "valid", 0
    if resolve_pads("same", in_shape[1:], a["kernel"], a["stride"], a["dilation"]) == pads:
        return "same", 0
    return "pad", pads


def _conv(node, in_shapes):
    a = node.attrs
    pad_mode, padding = _conv_padding(a, in_shapes[0])
    conv = nn.Conv2d(in_shapes[0][0], a["out_channels"], tuple(a["kernel"]), tuple(a["stride"]), pad_mode=pad_mode,
                     padding=padding, dilation=tuple(a["dilation"]), group=a["groups"],
                     has_bias=a["bias"], weight_init="zeros", bias_init="zeros")
    params = {"weight": conv.weight}
    if a["bias"]:
        params["bias"] = conv.bias
    return conv, params


def _dense(node, in_shapes):
    a = node.attrs
    lin = nn.Dense(in_shapes[0][0], a["out_features"], weight_init="zeros", bias_init="zeros", has_bias=a["bias"])
    return lin, ({"weight": lin.weight, "bias": lin.bias} if a["bias"] else {"weight": lin.weight})


# op -> (train, self-key, args, attrs) -> expression; cells made by CELLS below.
INLINE = {
    "relu": lambda a, x: f"ops.relu({x[0]})",
    "relu6": lambda a, x: f"ops.relu6({x[0]})",
    "leaky_relu": lambda a, x: f"ops.leaky_relu({x[0]}, {float(a['negative_slope'])!r})",
    "sigmoid": lambda a, x: f"ops.sigmoid({x[0]})",
    "tanh": lambda a, x: f"ops.tanh({x[0]})",
    "hardswish": lambda a, x: f"ops.hardswish({x[0]})",
    "hardsigmoid": lambda a, x: f"ops.hardsigmoid({x[0]})",
    "silu": lambda a, x: f"ops.silu({x[0]})",
    "softmax": lambda a, x: f"ops.softmax({x[0]}, 1)",
    "global_avgpool": lambda a, x: f"ops.mean({x[0]}, (2, 3), True)",
    "flatten": lambda a, x: f"ops.reshape({x[0]}, ({x[0]}.shape[0], -1))",
    "concat": lambda a, x: f"ops.concat(({', '.join(x)},), 1)",
    "add": lambda a, x: " + ".join(x),
    "mul": lambda a, x: f"{x[0]} * {x[1]}",
    "scale": lambda a, x: f"{x[0]} * {float(a['factor'])!r}",
    "channel_shuffle": lambda a, x: f"_shuffle({x[0]}, {int(a['groups'])})",
    "identity": lambda a, x: x[0],
}


def _split_expr(a, x, shape_in):
    step = shape_in[0] // a["parts"]
    return f"{x[0]}[:, {a['index'] * step}:{(a['index'] + 1) * step}]"


def _make_cell(node, in_shapes, graph=False):
    """(cell or None, canonical params) for nodes that need a Cell."""
    op = node.op
    if op == "conv2d":
        return _conv(node, in_shapes)
    if op == "linear":
        return _dense(node, in_shapes)
    if op == "batchnorm":
        bn = _BatchNorm(in_shapes[0][0], node.attrs)
        return bn, bn.params
    if op == "maxpool2d":
        return _cell_pool(node, in_shapes, "max", graph), {}
    if op == "avgpool2d":
        return _cell_pool(node, in_shapes, "avg"), {}
    if op == "adaptive_avgpool2d":
        return _cell_adaptive(node, in_shapes), {}
    if op == "lrn":
        return _LRN(node.attrs), {}
    if op == "dropout":
        return _Dropout(node.attrs["rate"], len(node.shape)), {}
    if op == "drop_path":
        return _DropPath(node.attrs["rate"], len(node.shape)), {}
    if op == "zeropad2d":
        return _ZeroPad(node.attrs["pad"]), {}
    return None, {}


CELL_OPS = {"conv2d", "linear", "batchnorm", "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "lrn", "dropout",
            "drop_path", "zeropad2d"}
SUPPORTED = CELL_OPS | set(INLINE) | {"channel_split", "input"}


# --------------------------------------------------------------------------- code generation


def _body(ir, keys, train):
    """Straight-line statements of one forward pass; returns (lines, value name per node)."""
    last = ir.last_use(train)
    index = {n.name: i for i, n in enumerate(ir.nodes)}
    where: dict[str, str] = {}
    free: list[str] = []
    count = 0
    lines = []
    for i, n in enumerate(ir.nodes):
        if n.op == "input":
            where[n.name] = "x"
            continue
        if n.train_only and not train:
            continue
        args = [where[s] for s in n.inputs]
        if n.op in ("dropout", "drop_path") and not train:
            expr = args[0]
        elif n.op in ("batchnorm", "maxpool2d"):  # cells whose kernels differ by mode
            expr = f"self.{keys[n.name]}({args[0]}, {train})"
        elif n.name in keys:
            expr = f"self.{keys[n.name]}({args[0]})"
        elif n.op == "channel_split":
            expr = _split_expr(n.attrs, args, ir.node(n.inputs[0]).shape)
        elif n.op in ("adaptive_avgpool2d", "dropout", "drop_path"):  # identity forms (no cell)
            expr = args[0]
        else:
            expr = INLINE[n.op](n.attrs, args)
        for s in dict.fromkeys(n.inputs):
            if last.get(s) == i and where[s] not in free:
                free.append(where[s])
        if free:
            out = free.pop()
        else:
            out = f"v{count}"
            count += 1
        lines.append(f"        {out} = {expr}  # {n.name}")
        where[n.name] = out
        assert index[n.name] == i
    return lines, where


def _source(ir, keys, class_name):
    main = ir.outputs[0].node
    ev, where = _body(ir, keys, False)
    tr, twhere = _body(ir, keys, True)
    outs = ", ".join(twhere[o.node] for o in ir.outputs)
    loss = ["        outs = self.forward_train(x)", "        loss = self.ce(outs[0], y)"]
    for k, o in enumerate(ir.outputs[1:], 1):
        loss.append(f"        loss = loss + {float(o.weight)!r} * self.ce(outs[{k}], y)")
    return "\n".join([
        f'"""Generated by samenet\'s MindSpore backend from {ir.name} ({ir.fingerprint()})."""',
        "",
        "",
        f"class {class_name}(nn.Cell):",
        "    def construct(self, x):",
        *ev,
        f"        return {where[main]}",
        "",
        "    def forward_train(self, x):",
        *tr,
        f"        return ({outs},)",
        "",
        "    def train_loss(self, x, y):",
        *loss,
        "        return loss",
        "",
    ])


def _generated_class(ir, keys):
    """Writes the generated source to a file and imports it (the graph compiler reads source)."""
    n = next(_GEN_COUNT)
    modname = f"samenet_mindspore_gen_{os.getpid()}_{n}"
    class_name = "Net_" + re.sub(r"\W", "_", ir.name)
    src = _source(ir, keys, class_name)
    path = os.path.join(_gen_dir(), modname + ".py")
    with open(path, "w") as f:
        f.write(src)
    mod = types.ModuleType(modname)
    mod.__file__ = path
    mod.__dict__.update(nn=nn, ops=ops, _shuffle=_shuffle)
    sys.modules[modname] = mod
    exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102  (our own generated code)
    return getattr(mod, class_name)


def _build_net(ir, graph=False):
    """The generated Cell with its sub-cells (``graph``: built for ms.jit, where some kernels differ);
    returns (net, canonical name -> Parameter, node name -> Cell)."""
    keys: dict[str, str] = {}
    cells: dict[str, Any] = {}
    canonical: dict[str, Any] = {}
    taken: set[str] = set()
    for n in ir.nodes:
        if n.op not in SUPPORTED:
            raise UnsupportedError(f"mindspore backend: op {n.op} not implemented")
        if n.op not in CELL_OPS:
            continue
        in_shapes = [ir.node(s).shape for s in n.inputs]
        cell, params = _make_cell(n, in_shapes, graph)
        for local, p in params.items():
            canonical[f"{n.name}.{local}"] = p
        if cell is None:
            continue
        key = "n_" + re.sub(r"\W", "_", n.name)
        while key in taken:
            key += "_"
        taken.add(key)
        keys[n.name] = key
        cells[key] = cell
    cls = _generated_class(ir, keys)
    net = cls()
    for key, cell in cells.items():
        setattr(net, key, cell)
    net.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    for name, p in canonical.items():  # readable, unique names (set after the auto-prefixing)
        p.name = name
    return net, canonical, {name: cells[k] for name, k in keys.items()}


# --------------------------------------------------------------------------- backend


class MindSporeBackend(Backend):
    """MindSpore 2.x (PyNative by default; ``graph`` = ms.jit, compile time in the first step)."""

    name = "mindspore"
    framework = "mindspore"
    distribution = "mindspore"
    exec_modes = ("pynative", "graph")
    known_gaps: dict[str, str] = {
        "train:inception_v3_keras": (
            "float32 rounding that numpy's float32 estimate undershoots, unprovable here: two steps miss by 97x "
            "the tolerance and 1.9e-5 in the step-2 loss (numpy float32: 26x); TF (22x, loss 1.7e-5) and Paddle "
            "(549x) miss too and their float64 builds match the oracle, but MindSpore's BatchNorm has no "
            "float64 kernel (float16/float32 only), so no float64 build proves it"),
    }
    bn_variance = "unbiased"

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        env = {"GLOG_v": "3"}
        if tuned:
            n = str(threads)
            env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, **TUNED_ENV)
        return env

    def import_framework(self) -> None:
        _import()
        _define_cells()

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
        self.target = self._select_device(kind, index)
        self.config = config
        self.ir = ir
        self.graph = config.exec_mode == "graph"
        prec = config.precision
        if prec != "fp32" and kind == "cpu":
            raise UnsupportedError(f"mindspore backend: precision {prec} is not supported on the CPU")
        if prec == "tf32" and kind != "cuda":
            raise UnsupportedError("mindspore backend: tf32 exists on CUDA only")
        if kind == "cuda":
            _gpu_tf32(prec == "tf32")
        self.net, self.canonical, self.cells = _build_net(ir, self.graph)
        self.amp = {"amp-bf16": ms.bfloat16, "amp-fp16": ms.float16}.get(prec)
        if self.amp is not None:
            ms.amp.auto_mixed_precision(self.net, "O1", dtype=self.amp)
        self.trainable = self.net.trainable_params()
        opt = config.optimizer
        self.loss_scaled = prec == "amp-fp16"
        if self.trainable:
            # One group: MindSpore then decays every parameter of it (ungrouped it skips beta/gamma).
            self.optimizer = nn.Momentum([{"params": self.trainable, "weight_decay": float(opt.weight_decay)}],
                                         learning_rate=float(opt.lr), momentum=float(opt.momentum))
            loss_cell = _TrainLoss(self.net)
            if self.loss_scaled:
                scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 16, scale_factor=2, scale_window=1000)
                self.train_cell = nn.TrainOneStepWithLossScaleCell(loss_cell, self.optimizer, scale_sense=scale)
            else:
                self.train_cell = nn.TrainOneStepCell(loss_cell, self.optimizer)
            self.train_cell.set_train(True)
        else:  # nothing to learn: the step is the train-mode forward (BN statistics) and the loss
            self.optimizer = None
            self.train_cell = _TrainLoss(self.net)
        self.eval_cell = _Fn(self.net, "eval")
        self.fwd_train_cell = _Fn(self.net, "train")
        self._compile()

    def _compile(self) -> None:
        """The callables the steps use; graph mode wraps them in ms.jit (fresh wrappers recompile)."""
        wrap = ms.jit if self.graph else (lambda c: c)
        self._eval = wrap(self.eval_cell)
        self._fwd_train = wrap(self.fwd_train_cell)
        self._train = wrap(self.train_cell)

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
            if not isinstance(cell, _Dropout):
                continue
            m = masks.get(name) if masks else None
            if m is None:
                changed |= cell.mask is not None
                cell.mask = None
                continue
            m = np.asarray(m, dtype=np.float32)
            if isinstance(cell, _DropPath):
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
        out = self._train(*batch)
        return out[0] if self.loss_scaled else out

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:  # a Parameter: graph mode reads its new value, no recompile
            # In place: the compiled optimizer step holds this Parameter; set_data would swap its
            # storage after the first step and the step would keep the old rate (measured).
            ops.assign(self.optimizer.learning_rate, Tensor(lr, ms.float32))

    def loss_value(self, loss) -> float:
        return float(loss.asnumpy())

    def synchronize(self) -> None:
        if self.target == "CPU":  # ms.runtime.synchronize() is for devices (it logs an error on CPU)
            from mindspore.common.api import _pynative_executor

            _pynative_executor.sync()
        else:
            ms.runtime.synchronize()

    def memory_stats(self) -> dict[str, float]:
        if self.target == "CPU":
            return {}
        mb = 1024 * 1024
        return {"alloc_peak_mb": ms.runtime.max_memory_allocated() / mb,
                "reserved_peak_mb": ms.runtime.max_memory_reserved() / mb}


def _pkg_supports(target: str) -> bool:
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().is_pkg_support_device(target))


def _gpu_tf32(allow: bool) -> None:
    from mindspore.device_context.gpu import op_precision

    for fn in (op_precision.conv_allow_tf32, op_precision.matmul_allow_tf32):
        try:
            fn(allow)
        except RuntimeError:  # set once per process
            pass
