"""The Paddle backend's builder table: one builder per op of samenet.ops.spec_ops().

A builder takes ``(node, ctx)`` and returns ``(layer, params)``: the node's paddle.nn.Layer
and its IR parameters, local name -> ``(tensor, transposed)`` (Paddle's Linear keeps its
weight as (in, out): transposed on the way in and out). Layers are created while the
build's storage dtype is Paddle's default dtype (``PaddleContext.dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from samenet.errors import UnsupportedError
from samenet.graph import BuildContext

from .layers import (Add, AvgPool, BatchNorm, ChannelSplit, Concat, Dropout, DropPath, Identity, MaxPool, Mul,
                     SumPool, Unary, ZeroPad2D)


@dataclass
class PaddleContext(BuildContext):
    """BuildContext plus the storage dtype (``float32``, or ``float64`` for verification)."""

    dtype: str = "float32"


def build_conv(node, ctx):
    a = node.attrs
    t, b, l, r = a["pad"]
    padding = [t, l] if (t == b and l == r) else [t, b, l, r]  # Paddle takes per-side pads natively
    conv = nn.Conv2D(ctx.in_shapes(node)[0][0], a["out_channels"], list(a["kernel"]), list(a["stride"]), padding,
                     list(a["dilation"]), a["groups"], bias_attr=None if a["bias"] else False)
    params = {"weight": (conv.weight, False)}
    if a["bias"]:
        params["bias"] = (conv.bias, False)
    return conv, params


def build_linear(node, ctx):
    a = node.attrs
    lin = nn.Linear(ctx.in_shapes(node)[0][0], a["out_features"], bias_attr=None if a["bias"] else False)
    params = {"weight": (lin.weight, True)}  # Paddle keeps (in, out): transposed
    if a["bias"]:
        params["bias"] = (lin.bias, False)
    return lin, params


def build_batchnorm(node, ctx):
    shape = ctx.in_shapes(node)[0]
    layer = BatchNorm(shape[0], node.attrs, len(shape))
    return layer, {k: (v, False) for k, v in layer.params().items()}


# --------------------------------------------------------------------------- pooling


def paddle_pool_out(n, k, s, p0, p1, ceil):
    """Paddle's own pooling output size (no PyTorch correction for windows in the pad)."""
    span = n + p0 + p1 - k
    return (-(-span // s) if ceil else span // s) + 1


def _pool_geometry(node, ctx):
    """((kh, kw), (sh, sw), (t, b, l, r), (H, W), (Ho, Wo)) of a pooling node."""
    a = node.attrs
    return tuple(a["kernel"]), tuple(a["stride"]), tuple(a["pad"]), tuple(ctx.in_shapes(node)[0][1:]), \
        tuple(node.shape[1:])


def _cut(node, out, want):
    """None where Paddle's output size is the IR's, else the IR's size to cut to."""
    if out[0] < want[0] or out[1] < want[1]:
        raise UnsupportedError(f"paddle backend: {node.name}: pooling output {out} smaller than the IR's {want}")
    return None if out == want else want


def build_maxpool2d(node, ctx):
    """Max pooling clips windows to the input (= -inf padding); Paddle's ceil mode keeps a last
    window that starts in the right padding, where the IR drops it: cut."""
    (kh, kw), (sh, sw), (t, b, l, r), (H, W), want = _pool_geometry(node, ctx)
    ceil = node.attrs["ceil_mode"]
    padding = [t, l] if (t == b and l == r) else [t, b, l, r]
    out = (paddle_pool_out(H, kh, sh, t, b, ceil), paddle_pool_out(W, kw, sw, l, r, ceil))
    return MaxPool([kh, kw], [sh, sw], padding, ceil, _cut(node, out, want)), {}


def build_avgpool2d(node, ctx):
    """Native only with symmetric pads and no window past the pads: then Paddle's divisor
    (all of the window, or its part inside the input) is the IR's. Otherwise explicit pads,
    window sums and the IR's divisor (SumPool)."""
    a = node.attrs
    (kh, kw), (sh, sw), (t, b, l, r), (H, W), (Ho, Wo) = _pool_geometry(node, ctx)
    full = ((Ho - 1) * sh + kh <= H + t + b) and ((Wo - 1) * sw + kw <= W + l + r)
    if not (t == b and l == r and full):
        return SumPool(a, (H, W), (Ho, Wo), ctx.dtype), {}
    out = (paddle_pool_out(H, kh, sh, t, b, False), paddle_pool_out(W, kw, sw, l, r, False))
    exclusive = not a.get("count_include_pad", True)  # Paddle's name for count_include_pad=False
    return AvgPool([kh, kw], [sh, sw], [t, l], exclusive, _cut(node, out, (Ho, Wo))), {}


def build_adaptive_avgpool2d(node, ctx):
    return Unary(F.adaptive_avg_pool2d, node.attrs["output_size"]), {}


def build_global_avgpool(node, ctx):
    return Unary(F.adaptive_avg_pool2d, 1), {}


# --------------------------------------------------------------------------- activations


def build_relu(node, ctx):
    return Unary(F.relu), {}


def build_relu6(node, ctx):
    return Unary(F.relu6), {}


def build_leaky_relu(node, ctx):
    return Unary(F.leaky_relu, node.attrs["negative_slope"]), {}


def build_sigmoid(node, ctx):
    return Unary(F.sigmoid), {}


def build_tanh(node, ctx):
    return Unary(paddle.tanh), {}


def build_hardswish(node, ctx):
    return Unary(F.hardswish), {}


def build_hardsigmoid(node, ctx):
    return Unary(F.hardsigmoid, 1.0 / 6.0, 0.5), {}  # slope 1/6 exactly (Paddle's default: 0.1666667)


def build_silu(node, ctx):
    return Unary(F.silu), {}


def build_gelu(node, ctx):
    return Unary(F.gelu, False), {}  # approximate=False: the exact erf form


def build_softmax(node, ctx):
    return Unary(F.softmax, 1), {}


# --------------------------------------------------------------------------- the rest


def build_flatten(node, ctx):
    return Unary(paddle.flatten, 1), {}


def build_dropout(node, ctx):
    return Dropout(node.attrs["rate"]), {}


def build_drop_path(node, ctx):
    return DropPath(node.attrs["rate"]), {}


def build_lrn(node, ctx):
    a = node.attrs  # Paddle divides alpha by the window size (as PyTorch): it gets alpha * size
    return Unary(F.local_response_norm, a["size"], a["alpha"] * a["size"], a["beta"], a["k"]), {}


def build_concat(node, ctx):
    return Concat(), {}


def build_add(node, ctx):
    return Add(), {}


def build_mul(node, ctx):
    return Mul(), {}


def build_scale(node, ctx):
    return Unary(paddle.scale, node.attrs["factor"]), {}


def build_channel_shuffle(node, ctx):
    return Unary(F.channel_shuffle, node.attrs["groups"]), {}


def build_channel_split(node, ctx):
    return ChannelSplit(node.attrs["parts"], node.attrs["index"]), {}


def build_identity(node, ctx):
    return Identity(), {}


def build_zeropad2d(node, ctx):
    t, b, l, r = node.attrs["pad"]
    return ZeroPad2D([l, r, t, b]), {}


BUILDERS = {
    "conv2d": build_conv,
    "linear": build_linear,
    "batchnorm": build_batchnorm,
    "relu": build_relu,
    "relu6": build_relu6,
    "leaky_relu": build_leaky_relu,
    "sigmoid": build_sigmoid,
    "tanh": build_tanh,
    "hardswish": build_hardswish,
    "hardsigmoid": build_hardsigmoid,
    "silu": build_silu,
    "gelu": build_gelu,
    "softmax": build_softmax,
    "maxpool2d": build_maxpool2d,
    "avgpool2d": build_avgpool2d,
    "adaptive_avgpool2d": build_adaptive_avgpool2d,
    "global_avgpool": build_global_avgpool,
    "flatten": build_flatten,
    "dropout": build_dropout,
    "drop_path": build_drop_path,
    "lrn": build_lrn,
    "concat": build_concat,
    "add": build_add,
    "mul": build_mul,
    "scale": build_scale,
    "channel_shuffle": build_channel_shuffle,
    "channel_split": build_channel_split,
    "identity": build_identity,
    "zeropad2d": build_zeropad2d,
}
