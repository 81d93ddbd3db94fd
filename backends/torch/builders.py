"""The PyTorch backend's builder table: one builder per op of samenet.ops.

Every builder takes ``(node, ctx)`` (ctx: :class:`TorchBuildContext`) and returns
``(layer, params)``: an nn.Module or a plain function of the node's inputs, and the tensors
of the IR's parameter table by local name (``weight``, ``running_mean``...). Builders run with
the build's dtype as torch's default and the build's device as the default device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from samenet.graph import BuildContext

from .layers import BatchNorm, Cut, Dropout, DropPath, Padded, SumPool

INPLACE_PRODUCERS = {"conv2d", "batchnorm", "linear", "add"}
"""Producers whose output ReLU and add may overwrite (torchvision's models do the same)."""


@dataclass
class TorchBuildContext(BuildContext):
    """BuildContext plus what the in-place decision needs: readers per node, the outputs."""

    users: dict[str, int] = field(init=False)
    outputs: set[str] = field(init=False)

    def __post_init__(self):
        self.users = {}
        for n in self.ir.nodes:
            for s in n.inputs:
                self.users[s] = self.users.get(s, 0) + 1
        self.outputs = {o.node for o in self.ir.outputs}

    def in_place(self, node) -> bool:
        """Whether ``node`` may overwrite its first input: a conv, BN, linear or add output that
        only this node reads and that is no output of the network."""
        src = self.ir.node(node.inputs[0])
        return src.op in INPLACE_PRODUCERS and self.users.get(src.name) == 1 and src.name not in self.outputs


def torch_pool_out(n, k, s, p, ceil):
    """PyTorch's own pooling output size (pooling_output_shape)."""
    if ceil:
        out = -(-(n + 2 * p - k) // s) + 1
        if (out - 1) * s >= n + p:
            out -= 1
        return out
    return (n + 2 * p - k) // s + 1


# --------------------------------------------------------------------------- layers with parameters


def build_conv2d(node, ctx):
    a = node.attrs
    t, b, l, r = a["pad"]
    sym = t == b and l == r
    conv = nn.Conv2d(ctx.in_shapes(node)[0][0], a["out_channels"], a["kernel"], a["stride"], (t, l) if sym else 0,
                     a["dilation"], a["groups"], a["bias"])
    params = {"weight": conv.weight}
    if a["bias"]:
        params["bias"] = conv.bias
    return (conv if sym else Padded(conv, (l, r, t, b))), params


def build_linear(node, ctx):
    a = node.attrs
    lin = nn.Linear(ctx.in_shapes(node)[0][0], a["out_features"], a["bias"])
    return lin, ({"weight": lin.weight, "bias": lin.bias} if a["bias"] else {"weight": lin.weight})


def build_batchnorm(node, ctx):
    shape = ctx.in_shapes(node)[0]
    m = BatchNorm(shape[0], node.attrs, len(shape))
    return m, m.params()


# --------------------------------------------------------------------------- pooling


def build_maxpool2d(node, ctx):
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    if t == b and l == r and t <= kh // 2 and l <= kw // 2:
        return nn.MaxPool2d((kh, kw), (sh, sw), (t, l), ceil_mode=a["ceil_mode"]), {}
    H, W = ctx.in_shapes(node)[0][1:]
    Ho, Wo = node.shape[1:]
    padded = Padded(nn.MaxPool2d((kh, kw), (sh, sw), 0, ceil_mode=True), (l, r, t, b), -math.inf)
    cut = (torch_pool_out(H + t + b, kh, sh, 0, True), torch_pool_out(W + l + r, kw, sw, 0, True)) != (Ho, Wo)
    return (Cut(padded, Ho, Wo) if cut else padded), {}


def build_avgpool2d(node, ctx):
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    if t == b and l == r and t <= kh // 2 and l <= kw // 2:
        return nn.AvgPool2d((kh, kw), (sh, sw), (t, l), a["ceil_mode"], a["count_include_pad"]), {}
    return SumPool(a, tuple(ctx.in_shapes(node)[0][1:]), tuple(node.shape[1:])), {}


def build_adaptive_avgpool2d(node, ctx):
    return nn.AdaptiveAvgPool2d(node.attrs["output_size"]), {}


def build_lrn(node, ctx):
    a = node.attrs  # PyTorch divides alpha by the window size
    return nn.LocalResponseNorm(a["size"], a["alpha"] * a["size"], a["beta"], a["k"]), {}


# --------------------------------------------------------------------------- stochastic


def build_dropout(node, ctx):
    return Dropout(node.attrs["rate"]), {}


def build_drop_path(node, ctx):
    return DropPath(node.attrs["rate"]), {}


# --------------------------------------------------------------------------- functions


def stateless(f):
    """A builder for a function of the inputs alone (no attributes, no parameters)."""
    return lambda node, ctx: (f, {})


def relu_(x):
    return F.relu(x, inplace=True)


def build_relu(node, ctx):
    return (relu_ if ctx.in_place(node) else F.relu), {}


def add(*xs):
    out = xs[0] + xs[1]
    for x in xs[2:]:
        out = out + x
    return out


def add_(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out.add_(x)
    return out


def build_add(node, ctx):
    return (add_ if ctx.in_place(node) else add), {}


def gelu(x):
    return F.gelu(x, approximate="none")


def softmax(x):
    return torch.softmax(x, dim=1)


def global_avgpool(x):
    return x.mean((2, 3), keepdim=True)


def flatten(x):
    return torch.flatten(x, 1)


def concat(*xs):
    return torch.cat(xs, dim=1)


def mul(x, y):
    return x * y


def identity(x):
    return x


def build_leaky_relu(node, ctx):
    slope = node.attrs["negative_slope"]
    return (lambda x: F.leaky_relu(x, slope)), {}


def build_scale(node, ctx):
    factor = node.attrs["factor"]
    return (lambda x: x * factor), {}


def build_channel_shuffle(node, ctx):
    g = node.attrs["groups"]

    def shuffle(x):
        n, c, h, w = x.shape
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    return shuffle, {}


def build_channel_split(node, ctx):
    parts, index = node.attrs["parts"], node.attrs["index"]
    return (lambda x: torch.chunk(x, parts, dim=1)[index]), {}


def build_zeropad2d(node, ctx):
    t, b, l, r = node.attrs["pad"]
    pad = (l, r, t, b)
    return (lambda x: F.pad(x, pad)), {}


BUILDERS = {
    "conv2d": build_conv2d,
    "linear": build_linear,
    "batchnorm": build_batchnorm,
    "relu": build_relu,
    "relu6": stateless(F.relu6),
    "leaky_relu": build_leaky_relu,
    "sigmoid": stateless(torch.sigmoid),
    "tanh": stateless(torch.tanh),
    "hardswish": stateless(F.hardswish),
    "hardsigmoid": stateless(F.hardsigmoid),
    "silu": stateless(F.silu),
    "gelu": stateless(gelu),
    "softmax": stateless(softmax),
    "maxpool2d": build_maxpool2d,
    "avgpool2d": build_avgpool2d,
    "adaptive_avgpool2d": build_adaptive_avgpool2d,
    "global_avgpool": stateless(global_avgpool),
    "flatten": stateless(flatten),
    "dropout": build_dropout,
    "drop_path": build_drop_path,
    "lrn": build_lrn,
    "concat": stateless(concat),
    "add": build_add,
    "mul": stateless(mul),
    "scale": build_scale,
    "channel_shuffle": build_channel_shuffle,
    "channel_split": build_channel_split,
    "identity": stateless(identity),
    "zeropad2d": build_zeropad2d,
}
"""Op name -> builder; the keys are exactly samenet.ops.spec_ops() (a core test reads them)."""
