"""The op builders: one per op of samenet.ops, in ``BUILDERS``.

A builder gets ``(node, ctx)`` (an IR node and the :class:`MXNetBuildContext`) and returns
``(fn, constants)``: ``fn(F, xs, P, masks)`` computes the node against MXNet's operator
namespace ``F`` (``mx.nd`` imperatively, ``mx.sym`` when traced), so the same code runs both
ways; ``xs`` are its inputs, ``P`` maps the node's local parameter names (``weight``,
``running_mean``) and its constants' names to arrays/symbols, ``masks`` holds the fixed
keep-masks by node slot (or None). Constants are numpy arrays made at build time, cast to
the build dtype with the parameters.

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
      zero pad, pool_type "sum" and division by samenet.ops.avgpool_divisor (a constant), so
      count_include_pad and the ceil-mode overhang follow the canon exactly.
    * adaptive_avgpool2d: contrib.AdaptiveAvgPooling2D uses PyTorch's bins
      (samenet.ops.adaptive_pool_matrix); checked by the conformance cases.
    * BatchNorm: MXNet's momentum is the weight of the running value (running = momentum *
      running + (1 - momentum) * batch): it gets 1 - IR momentum. MXNet updates the running
      variance with the biased batch variance (bn_variance = "biased"). scale/center off:
      gamma ones / beta zeros made in the graph (fix_gamma for a missing scale).
    * LRN: MXNet's LRN divides alpha by nsize (Caffe), so it gets alpha * size; its window
      is only the canon's for odd sizes, even sizes use an explicit sum over a padded
      channel window.
    * Dropout: native Dropout; drop_path: Dropout with ``axes`` = all but the batch axis
      (one Bernoulli per sample). Fixed keep-masks (set_masks) enter the graph as inputs.
      In the eval graph both are skipped (the graph passes their input through).
    * ReLU, sigmoid, tanh use ``Activation`` (oneDNN-backed on CPU): ``F.relu`` is not, and
      would make oneDNN reorder every conv output back to plain layout (-35% at inference).
    * GELU: ``LeakyReLU(act_type="gelu")`` is the exact erf form, but MXNet computes it (and
      erf's gradient) in float32 whatever the dtype; the float64 build composes it from
      float64 ops (:func:`_gelu_float64`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from samenet.errors import UnsupportedError
from samenet.graph import BuildContext
from samenet.ops import avgpool_divisor


@dataclass
class MXNetBuildContext(BuildContext):
    """The build state the builders read.

    Attributes:
        dtype: Storage dtype of the build (``float32``, or ``float64`` for verification).
        slots: Node name -> its slot (position in ``ir.nodes``), the key of a fixed mask.
    """

    dtype: str = "float32"
    slots: dict[str, int] = field(default_factory=dict)


def _same(fn):
    """A builder's result for a node without constants."""
    return fn, {}


def _unary(f):
    """A one-input node computed by ``f(F, x)``."""
    return (lambda F, xs, P, masks: f(F, xs[0])), {}


def _pad4(F, x, t, b, l, r, value=0.0):
    return F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, t, b, l, r), constant_value=value)


def _mx_pool_out(n, k, s, p, full):
    """MXNet's Pooling output size (pad p per side, 'valid' or 'full' convention)."""
    span = n + 2 * p - k
    return 1 + (-(-span // s) if full else span // s)


# --------------------------------------------------------------------------- weighted, normalisers


def build_conv2d(node, ctx):
    a = node.attrs
    t, b, l, r = a["pad"]
    sym = t == b and l == r
    kw = dict(kernel=tuple(a["kernel"]), stride=tuple(a["stride"]), dilate=tuple(a["dilation"]),
              pad=(t, l) if sym else (0, 0), num_filter=a["out_channels"], num_group=a["groups"],
              no_bias=not a["bias"], layout="NCHW")
    bias = a["bias"]

    def conv(F, xs, P, masks):
        x = xs[0] if sym else _pad4(F, xs[0], t, b, l, r)
        if bias:
            return F.Convolution(x, P["weight"], P["bias"], **kw)
        return F.Convolution(x, P["weight"], **kw)

    return conv, {}


def build_linear(node, ctx):
    a = node.attrs
    n, bias = a["out_features"], a["bias"]

    def linear(F, xs, P, masks):
        if bias:
            return F.FullyConnected(xs[0], P["weight"], P["bias"], num_hidden=n, flatten=True)
        return F.FullyConnected(xs[0], P["weight"], num_hidden=n, no_bias=True, flatten=True)

    return linear, {}


def build_batchnorm(node, ctx):
    a = node.attrs
    scale, center = a["scale"], a["center"]
    kw = dict(eps=a["eps"], momentum=1.0 - a["momentum"], fix_gamma=not scale, use_global_stats=False, axis=1)

    def bn(F, xs, P, masks):
        mean, var = P["running_mean"], P["running_var"]
        gamma = P["weight"] if scale else F.ones_like(mean)
        beta = P["bias"] if center else F.zeros_like(mean)
        return F.BatchNorm(xs[0], gamma, beta, mean, var, **kw)

    return bn, {}


def build_lrn(node, ctx):
    a = node.attrs
    n, alpha, beta, k = a["size"], a["alpha"], a["beta"], a["k"]
    if n % 2 == 1:
        return _unary(lambda F, x: F.LRN(x, alpha=alpha * n, beta=beta, knorm=k, nsize=n))
    C, H, W = ctx.in_shapes(node)[0]

    def lrn_even(F, xs, P, masks):
        # sum of squares over channels [c - n//2, c + (n-1)//2], as a sum pooling over a
        # (channel, pixel) plane padded with zeros
        x = xs[0]
        sq = F.reshape(F.square(x), shape=(0, 1, C, H * W))
        sq = _pad4(F, sq, n // 2, (n - 1) // 2, 0, 0)
        s = F.Pooling(sq, kernel=(n, 1), stride=(1, 1), pool_type="sum")
        s = F.reshape(s, shape=(0, C, H, W))
        return x * ((s * alpha + k) ** (-beta))

    return lrn_even, {}


# --------------------------------------------------------------------------- activations


def _hardsigmoid(F, x):
    return F.clip(x + 3.0, 0.0, 6.0) / 6.0


def build_relu(node, ctx):
    return _unary(lambda F, x: F.Activation(x, act_type="relu"))  # oneDNN-backed, unlike F.relu


def build_relu6(node, ctx):
    return _unary(lambda F, x: F.clip(x, 0.0, 6.0))


def build_leaky_relu(node, ctx):
    slope = node.attrs["negative_slope"]
    return _unary(lambda F, x: F.LeakyReLU(x, act_type="leaky", slope=slope))


def build_sigmoid(node, ctx):
    return _unary(lambda F, x: F.Activation(x, act_type="sigmoid"))


def build_tanh(node, ctx):
    return _unary(lambda F, x: F.Activation(x, act_type="tanh"))


def build_hardswish(node, ctx):
    return _unary(lambda F, x: x * _hardsigmoid(F, x))


def build_hardsigmoid(node, ctx):
    return _unary(_hardsigmoid)


def build_silu(node, ctx):
    return _unary(lambda F, x: x * F.Activation(x, act_type="sigmoid"))


_RSQRT2 = 1.0 / math.sqrt(2.0)
_RSQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_float64(F, x):
    """x * Phi(x), value and gradient in float64.

    MXNet's gelu kernel and erf's gradient compute in float32 (erf_grad uses a float PI,
    3e-8 relative), so the value comes from float64 erf and the gradient from the written
    derivative Phi(x) + x * phi(x), attached with a zero-valued straight-through term
    (t - BlockGrad(t) is exactly 0 and has t's gradient).
    """
    cdf = 0.5 * (1.0 + F.erf(x * _RSQRT2))
    slope = F.BlockGrad(cdf + x * (F.exp(-0.5 * F.square(x)) * _RSQRT2PI))
    t = x * slope
    return F.BlockGrad(x * cdf) + (t - F.BlockGrad(t))


def build_gelu(node, ctx):
    if ctx.dtype == "float64":
        return _unary(_gelu_float64)
    return _unary(lambda F, x: F.LeakyReLU(x, act_type="gelu"))  # the erf form (oneDNN's gelu_erf on CPU)


def build_softmax(node, ctx):
    return _unary(lambda F, x: F.softmax(x, axis=1))


# --------------------------------------------------------------------------- pooling


def _pool_plan(node, ctx):
    """(pad is symmetric, Pooling's pad, its convention, the output needs a cut) of a pool node."""
    a = node.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    H, W = ctx.in_shapes(node)[0][1:]
    Ho, Wo = node.shape[1:]
    sym = t == b and l == r
    if sym:
        ph, pw, eh, ew = t, l, H, W
    else:
        ph, pw, eh, ew = 0, 0, H + t + b, W + l + r  # explicit pad first
    valid = (_mx_pool_out(eh, kh, sh, ph, False), _mx_pool_out(ew, kw, sw, pw, False))
    full = (_mx_pool_out(eh, kh, sh, ph, True), _mx_pool_out(ew, kw, sw, pw, True))
    convention, got = ("valid", valid) if valid == (Ho, Wo) else ("full", full)
    if got[0] < Ho or got[1] < Wo:  # cannot happen (full >= ceil), but never silently
        raise UnsupportedError(f"mxnet backend: pooling {node.name}: MXNet gives {got}, IR wants {(Ho, Wo)}")
    return sym, (ph, pw), convention, got != (Ho, Wo)


def _pool(node, ctx, kind):
    a = node.attrs
    t, b, l, r = a["pad"]
    Ho, Wo = node.shape[1:]
    sym, pad, convention, cut = _pool_plan(node, ctx)
    native_avg = kind == "avg" and sym and not cut
    pool_type = kind if (kind == "max" or native_avg) else "sum"
    kwargs = dict(kernel=tuple(a["kernel"]), stride=tuple(a["stride"]), pad=pad, pool_type=pool_type,
                  pooling_convention=convention)
    if pool_type == "avg":
        kwargs["count_include_pad"] = a["count_include_pad"]
    consts = {}
    divide = kind == "avg" and not native_avg
    if divide:
        div = avgpool_divisor(tuple(ctx.in_shapes(node)[0][1:]), a, (Ho, Wo))  # cast with the other constants
        consts["divisor"] = div.reshape(1, 1, Ho, Wo)
    pad_value = -np.inf if kind == "max" else 0.0

    def pool(F, xs, P, masks):
        x = xs[0] if sym else _pad4(F, xs[0], t, b, l, r, pad_value)
        y = F.Pooling(x, **kwargs)
        if cut:
            y = F.slice(y, begin=(None, None, 0, 0), end=(None, None, Ho, Wo))
        if divide:
            y = F.broadcast_div(y, P["divisor"])
        return y

    return pool, consts


def build_maxpool2d(node, ctx):
    return _pool(node, ctx, "max")


def build_avgpool2d(node, ctx):
    return _pool(node, ctx, "avg")


def build_adaptive_avgpool2d(node, ctx):
    size = tuple(node.attrs["output_size"])
    if tuple(ctx.in_shapes(node)[0][1:]) == size:
        return _unary(lambda F, x: x)
    return _unary(lambda F, x: F.contrib.AdaptiveAvgPooling2D(x, output_size=size))


def build_global_avgpool(node, ctx):
    return _unary(lambda F, x: F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg"))


# --------------------------------------------------------------------------- stochastic


def build_dropout(node, ctx):
    rate = node.attrs["rate"]
    slot = ctx.slots[node.name]

    def dropout(F, xs, P, masks):
        if not rate:
            return xs[0]
        mask = masks.get(slot) if masks else None
        if mask is not None:
            return F.broadcast_mul(xs[0], mask)  # mask already holds keep / (1 - rate)
        return F.Dropout(xs[0], p=rate)

    return dropout, {}


def build_drop_path(node, ctx):
    rate = node.attrs["rate"]
    slot = ctx.slots[node.name]
    axes = tuple(range(1, len(ctx.in_shapes(node)[0]) + 1))

    def drop_path(F, xs, P, masks):
        if not rate:
            return xs[0]
        mask = masks.get(slot) if masks else None
        if mask is not None:
            return F.broadcast_mul(xs[0], mask)
        return F.Dropout(xs[0], p=rate, axes=axes)

    return drop_path, {}


# --------------------------------------------------------------------------- structure


def build_flatten(node, ctx):
    return _unary(lambda F, x: F.Flatten(x))


def build_concat(node, ctx):
    return _same(lambda F, xs, P, masks: F.concat(*xs, dim=1))


def build_add(node, ctx):
    def add(F, xs, P, masks):
        if len(xs) == 2:
            return F.elemwise_add(xs[0], xs[1])
        return F.add_n(*xs)

    return add, {}


def build_mul(node, ctx):
    shapes = ctx.in_shapes(node)
    if tuple(shapes[0]) == tuple(shapes[1]):
        return _same(lambda F, xs, P, masks: F.elemwise_mul(xs[0], xs[1]))
    return _same(lambda F, xs, P, masks: F.broadcast_mul(xs[0], xs[1]))


def build_scale(node, ctx):
    factor = node.attrs["factor"]
    return _unary(lambda F, x: x * factor)


def build_channel_shuffle(node, ctx):
    g = node.attrs["groups"]
    C, H, W = ctx.in_shapes(node)[0]

    def shuffle(F, xs, P, masks):
        x = F.reshape(xs[0], shape=(0, g, C // g, H, W))
        return F.reshape(F.swapaxes(x, 1, 2), shape=(0, C, H, W))

    return shuffle, {}


def build_channel_split(node, ctx):
    parts, index = node.attrs["parts"], node.attrs["index"]
    step = ctx.in_shapes(node)[0][0] // parts
    begin, end = index * step, (index + 1) * step
    return _unary(lambda F, x: F.slice_axis(x, axis=1, begin=begin, end=end))


def build_identity(node, ctx):
    return _unary(lambda F, x: x)


def build_zeropad2d(node, ctx):
    t, b, l, r = node.attrs["pad"]
    return _unary(lambda F, x: _pad4(F, x, t, b, l, r))


BUILDERS = {
    "conv2d": build_conv2d,
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
"""Op name -> builder; the keys are exactly samenet.ops.spec_ops() (a core test reads them)."""
