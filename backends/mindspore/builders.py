"""The builder table: one builder per op, ``(node, ctx) -> Layer``.

A Layer is what the network's schedule calls for the node in eval and in train mode (the
same callable for most ops), the Cell that holds its parameters or state (registered in the
network under the node's layer name), and its parameters by canonical local name.

Conventions handled here (see harness/ops.py for the canonical ones):
    * Layouts are MindSpore's own (Conv2d OIHW, Dense (out, in)): weights load as they are.
    * Conv2d: pad_mode="valid" or "same" where those give the IR's pads exactly (faster to
      dispatch in PyNative), else "pad" with padding=(top, bottom, left, right), MindSpore's
      order (checked against the reference with asymmetric pads).
    * Pooling: explicit pads (-inf for max, 0 for average) of the IR's pads plus any
      ceil-mode overhang, then the native VALID pooling, so the output is the IR's size
      (cells.MaxPool, cells.AvgPool). Average pooling then multiplies by kh*kw / divisor
      (samenet.ops.avgpool_divisor) where that map is not all ones (count_include_pad=False
      or ceil overhang).
    * adaptive_avgpool2d: identity, an exact VALID average pool when the sizes divide,
      else two matmuls with samenet.ops.adaptive_pool_matrix.
    * dropout, drop_path: the identity in eval mode (cells.identity passes the input on).
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (sets MindSpore's log level and dump path before its import)

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from mindspore import nn, ops

from samenet.graph import BuildContext
from samenet.ops import adaptive_pool_matrix, avgpool_divisor, resolve_pads

from . import cells


@dataclass
class Context(BuildContext):
    """The build's state beside the IR and config: ``graph`` (built for ms.jit, where the
    max pool's training kernel differs)."""

    graph: bool = False


@dataclass(frozen=True)
class Layer:
    """One node as the network runs it.

    Attributes:
        eval: Called on the node's inputs in eval mode.
        train: Called in train mode.
        cell: The Cell holding its parameters or state, if any (registered in the network).
        params: Canonical local name (``weight``, ``running_mean``...) -> Parameter.
    """

    eval: Callable
    train: Callable
    cell: Any = None
    params: dict = field(default_factory=dict)


def _cell(cell, params=None) -> Layer:
    """A Layer that calls ``cell`` in both modes."""
    return Layer(cell, cell, cell, params or {})


def _function(fn):
    """The builder of a parameter-free op that is one function call in both modes."""

    def build(node, ctx) -> Layer:
        return Layer(fn, fn)

    return build


def build_identity(node, ctx) -> Layer:
    return Layer(cells.identity, cells.identity)


# --------------------------------------------------------------------------- learned layers


def conv_padding(a, in_shape):
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


def build_conv2d(node, ctx) -> Layer:
    a = node.attrs
    in_shape = ctx.in_shapes(node)[0]
    pad_mode, padding = conv_padding(a, in_shape)
    conv = nn.Conv2d(in_shape[0], a["out_channels"], tuple(a["kernel"]), tuple(a["stride"]), pad_mode=pad_mode,
                     padding=padding, dilation=tuple(a["dilation"]), group=a["groups"],
                     has_bias=a["bias"], weight_init="zeros", bias_init="zeros")
    params = {"weight": conv.weight}
    if a["bias"]:
        params["bias"] = conv.bias
    return _cell(conv, params)


def build_linear(node, ctx) -> Layer:
    a = node.attrs
    lin = nn.Dense(ctx.in_shapes(node)[0][0], a["out_features"], weight_init="zeros", bias_init="zeros",
                   has_bias=a["bias"])
    return _cell(lin, {"weight": lin.weight, "bias": lin.bias} if a["bias"] else {"weight": lin.weight})


def build_batchnorm(node, ctx) -> Layer:
    bn = cells.BatchNorm(ctx.in_shapes(node)[0][0], node.attrs)
    return Layer(bn, bn.forward_train, bn, bn.params)


# --------------------------------------------------------------------------- pooling


def pool_pads(node, in_shape):
    """(left, right + overhang, top, bottom + overhang): the IR's pads and the ceil-mode overhang."""
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    H, W = in_shape[1:]
    Ho, Wo = node.shape[1:]
    extra_h = max((Ho - 1) * sh + kh - (H + t + b), 0)
    extra_w = max((Wo - 1) * sw + kw - (W + l + r), 0)
    return (l, r + extra_w, t, b + extra_h)


def build_maxpool2d(node, ctx) -> Layer:
    a = node.attrs
    in_shape = ctx.in_shapes(node)[0]
    pool = cells.MaxPool(a["kernel"], a["stride"], pool_pads(node, in_shape), in_shape, ctx.graph)
    return Layer(pool, pool.native_pool if pool.native else pool, pool)


def build_avgpool2d(node, ctx) -> Layer:
    a = node.attrs
    in_shape = ctx.in_shapes(node)[0]
    div = avgpool_divisor(in_shape[1:], a, node.shape[1:])
    factor = a["kernel"][0] * a["kernel"][1] / div
    factor = None if np.all(factor == 1.0) else factor.astype(np.float32)[None, None]
    return _cell(cells.AvgPool(a["kernel"], a["stride"], pool_pads(node, in_shape), factor))


def build_adaptive_avgpool2d(node, ctx) -> Layer:
    H, W = ctx.in_shapes(node)[0][1:]
    ho, wo = node.attrs["output_size"]
    if (H, W) == (ho, wo):
        return build_identity(node, ctx)
    if H % ho == 0 and W % wo == 0:  # equal, disjoint bins: a plain average pool
        k = (H // ho, W // wo)
        return _cell(cells.AvgPool(k, k, (0, 0, 0, 0), None))
    mh = adaptive_pool_matrix(H, ho).astype(np.float32)
    mwt = adaptive_pool_matrix(W, wo).T.astype(np.float32).copy()
    return _cell(cells.AdaptiveAvgPool(mh, mwt))


# --------------------------------------------------------------------------- the rest


def build_dropout(node, ctx) -> Layer:
    cell = cells.Dropout(node.attrs["rate"], len(node.shape))
    return Layer(cells.identity, cell, cell)


def build_drop_path(node, ctx) -> Layer:
    cell = cells.DropPath(node.attrs["rate"], len(node.shape))
    return Layer(cells.identity, cell, cell)


def build_lrn(node, ctx) -> Layer:
    return _cell(cells.LRN(node.attrs))


def build_zeropad2d(node, ctx) -> Layer:
    return _cell(cells.ZeroPad(node.attrs["pad"]))


def build_leaky_relu(node, ctx) -> Layer:
    return _cell(cells.LeakyRelu(float(node.attrs["negative_slope"])))


def build_scale(node, ctx) -> Layer:
    return _cell(cells.Scale(float(node.attrs["factor"])))


def build_channel_shuffle(node, ctx) -> Layer:
    return _cell(cells.ChannelShuffle(int(node.attrs["groups"])))


def build_channel_split(node, ctx) -> Layer:
    a = node.attrs
    step = ctx.in_shapes(node)[0][0] // a["parts"]
    return _cell(cells.ChannelSplit(a["index"] * step, (a["index"] + 1) * step))


BUILDERS = {
    "conv2d": build_conv2d,
    "linear": build_linear,
    "batchnorm": build_batchnorm,
    "relu": _function(ops.relu),
    "relu6": _function(ops.relu6),
    "leaky_relu": build_leaky_relu,
    "sigmoid": _function(ops.sigmoid),
    "tanh": _function(ops.tanh),
    "hardswish": _function(ops.hardswish),
    "hardsigmoid": _function(ops.hardsigmoid),
    "silu": _function(ops.silu),
    "gelu": _function(cells.gelu),
    "softmax": _function(cells.softmax),
    "maxpool2d": build_maxpool2d,
    "avgpool2d": build_avgpool2d,
    "adaptive_avgpool2d": build_adaptive_avgpool2d,
    "global_avgpool": _function(cells.global_avgpool),
    "flatten": _function(cells.flatten),
    "dropout": build_dropout,
    "drop_path": build_drop_path,
    "lrn": build_lrn,
    "concat": _function(cells.concat),
    "add": _function(cells.add),
    "mul": _function(cells.mul),
    "scale": build_scale,
    "channel_shuffle": build_channel_shuffle,
    "channel_split": build_channel_split,
    "identity": build_identity,
    "zeropad2d": build_zeropad2d,
}
