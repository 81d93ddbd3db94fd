"""The IR as a Keras 3 functional model: the builder shared by the Keras backends.

Three backends run the same Keras model: ``tf`` (Keras on TensorFlow, keras_backend.py),
``keras-torch`` and ``keras-jax`` (Keras on PyTorch and on JAX). This module holds what they
share: one Keras layer (or a few) per IR node, the canonical <-> Keras weight layouts, and
layer classes written in ``keras.ops`` that every Keras backend runs. A backend may replace a
layer class with a faster one for its own framework (the tf backend runs TF's fused batch
norm, BiasAdd in the layer's data format and tf.nn pooling in NCHW); the builder takes the
classes from the namespace it is given.

Conventions (harness/ops.py holds the canonical ones):
    * Activations are NHWC by default (``layout=channels_last``, what Keras users run);
      ``channels_first`` builds NCHW layers (``data_format="channels_first"``). forward()
      takes and returns canonical NCHW / (N, F) numpy; to_device() transposes a batch once,
      before any timing.
    * Weights are stored in Keras layouts and transposed on set_weights/get_weights
      (transposes only, so the round trip is byte-exact): conv OIHW -> HWIO; a conv with
      groups == in_channels becomes DepthwiseConv2D, (C*M, 1, kh, kw) -> (kh, kw, C, M);
      other groups use Conv2D(groups=g) with kernel (kh, kw, C/g, O); linear (out, in) ->
      (in, out).
    * Padding: Keras "same" is used only where it is provably identical, i.e. when the
      node's resolved pads equal harness.ops.same_pads on both axes (and, for pooling, the
      output size and the divisor map agree too). Everything else is explicit: a
      ZeroPadding2D before the conv / average pool, a -inf pad before max pooling, each with
      the extra bottom/right pad of a ceil-mode overhang, then "valid" pooling. Average
      pooling whose divisor map (harness.ops.avgpool_divisor) is not the constant kh*kw is
      corrected by a constant factor map kh*kw / divisor after the valid pool.
    * adaptive_avgpool2d: a plain AveragePooling2D when the bins tile the input exactly,
      otherwise the exact averaging matrices of harness.ops.adaptive_pool_matrix (einsum).
    * flatten keeps C, H, W order: in NHWC a Permute((3, 1, 2)) precedes the Flatten (it is
      skipped when H*W == 1 or C == 1, where both orders agree). The linear layer that
      follows keeps the canonical weight, only transposed.
    * BatchNorm (generic): Keras' own BatchNormalization with momentum 1 - m (the IR's m is
      PyTorch's) and eps as given. Keras updates the running variance with the *biased*
      batch variance, so the generic backends declare ``bn_variance = "biased"``.
    * LRN: an exact window sum of squares (n // 2 channels before, (n - 1) // 2 after).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os
from typing import Any, ClassVar

import numpy as np

from harness.backend import Backend, split_device
from harness.errors import UnsupportedError
from harness.ops import adaptive_pool_matrix, avgpool_divisor, same_pads

keras = None
ops = None
_GENERIC: Any = None  # namespace of the generic layer classes, defined once keras is imported

POLICIES = {"fp32": "float32", "tf32": "float32", "amp-bf16": "mixed_bfloat16", "amp-fp16": "mixed_float16",
            "fp64": "float64"}
"""Keras dtype policy per precision; fp64 (harness.backend.VERIFY_PRECISION) where a backend
``verifies_fp64``: tf and keras-torch (JAX computes float64 only with x64 enabled)."""


def import_keras(keras_backend: str, label: str):
    """Imports Keras 3 running on ``keras_backend`` (KERAS_BACKEND must agree); returns it."""
    global keras, ops
    os.environ.setdefault("KERAS_BACKEND", keras_backend)
    import keras as _keras

    if not _keras.__version__.startswith("3"):
        raise UnsupportedError(f"{label} backend needs Keras 3, found keras {_keras.__version__}")
    if _keras.backend.backend() != keras_backend:
        raise UnsupportedError(f"{label} backend: Keras runs on '{_keras.backend.backend()}' "
                               f"(set KERAS_BACKEND={keras_backend})")
    keras, ops = _keras, _keras.ops
    return _keras


class Namespace:
    """Layer classes by name; ``with_overrides`` returns a copy with some replaced."""

    def __init__(self, **classes):
        self.__dict__.update(classes)

    def with_overrides(self, *classes) -> "Namespace":
        return Namespace(**{**self.__dict__, **{c.__name__: c for c in classes}})


# --------------------------------------------------------------------------- generic layers


def generic_layers() -> Namespace:
    """The layer classes in keras.ops (they need keras.layers at class-creation time)."""
    global _GENERIC
    if _GENERIC is not None:
        return _GENERIC

    class BatchNorm(keras.layers.BatchNormalization):
        """Keras BN given the IR's (PyTorch-sense) momentum m: Keras momentum 1 - m."""

        def __init__(self, torch_momentum: float, **kwargs):
            super().__init__(momentum=1.0 - torch_momentum, **kwargs)
            self.torch_momentum = float(torch_momentum)

    class Dropout(keras.layers.Dropout):
        """Keras Dropout; a fixed keep-mask (native layout) can be set for parity runs."""

        fixed_mask = None

        def call(self, inputs, training=False):
            if training and self.rate > 0 and self.fixed_mask is not None:
                return inputs * ops.cast(self.fixed_mask, inputs.dtype) / (1.0 - self.rate)
            return super().call(inputs, training=training)

    class DropPath(keras.layers.Layer):
        """Stochastic depth: one keep decision per sample, inverted scaling."""

        fixed_mask = None

        def __init__(self, rate, **kwargs):
            super().__init__(**kwargs)
            self.rate = float(rate or 0.0)
            self.seed_generator = keras.random.SeedGenerator()

        def call(self, inputs, training=False):
            if not training or not self.rate:
                return inputs
            shape = (-1,) + (1,) * (len(inputs.shape) - 1)
            if self.fixed_mask is not None:
                keep = ops.reshape(ops.cast(self.fixed_mask, inputs.dtype), shape)
            else:
                u = keras.random.uniform((ops.shape(inputs)[0],), seed=self.seed_generator)
                keep = ops.reshape(ops.cast(u >= self.rate, inputs.dtype), shape)
            return inputs * keep / (1.0 - self.rate)

    class Pad(keras.layers.Layer):
        """Constant padding of H and W per side (-inf before max pooling)."""

        def __init__(self, pads, value, channels_last, **kwargs):
            super().__init__(**kwargs)
            t, b, l, r = pads
            self.paddings = ([[0, 0], [t, b], [l, r], [0, 0]] if channels_last
                             else [[0, 0], [0, 0], [t, b], [l, r]])
            self.value = float(value)

        def call(self, x):
            return ops.pad(x, self.paddings, constant_values=self.value)

    class Pool(keras.layers.Layer):
        """Max/avg pooling, valid or same, in either layout, then an optional constant factor
        map (average pooling divisor correction). Used for channels_first."""

        def __init__(self, kind, kernel, stride, padding, channels_last, factor=None, **kwargs):
            super().__init__(**kwargs)
            self.kind, self.kernel, self.stride, self.padding = kind, tuple(kernel), tuple(stride), padding
            self.channels_last = channels_last
            self.factor = factor  # numpy (1, Ho, Wo, 1) / (1, 1, Ho, Wo) or None

        def call(self, x):
            f = ops.max_pool if self.kind == "max" else ops.average_pool
            y = f(x, self.kernel, self.stride, self.padding.lower(),
                  data_format="channels_last" if self.channels_last else "channels_first")
            if self.factor is not None:
                y = y * ops.convert_to_tensor(self.factor, y.dtype)
            return y

    class Rescale(keras.layers.Layer):
        """y = x * constant (a scalar or a broadcastable constant map)."""

        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * ops.convert_to_tensor(self.factor, x.dtype)

    class AdaptiveAvgPool(keras.layers.Layer):
        """PyTorch adaptive average pooling via its exact (n_out, n_in) averaging matrices."""

        def __init__(self, mh, mw, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.mh, self.mw = mh, mw  # float64 numpy, cast to the activation's dtype in call
            self.eq = "nhwc,ih,jw->nijc" if channels_last else "nchw,ih,jw->ncij"

        def call(self, x):
            return ops.einsum(self.eq, x, ops.convert_to_tensor(self.mh, x.dtype),
                              ops.convert_to_tensor(self.mw, x.dtype))

    class LRN(keras.layers.Layer):
        """b_c = a_c / (k + alpha * sum_{c-floor(n/2)}^{c+ceil(n/2)-1} a^2)^beta (paper form)."""

        def __init__(self, size, alpha, beta, k, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
            self.channels_last = channels_last

        def call(self, x):
            return self.window_lrn(x)

        def window_lrn(self, x):
            n = self.size
            axis = 3 if self.channels_last else 1
            c = x.shape[axis]
            pad = [[0, 0]] * 4
            pad[axis] = [n // 2, (n - 1) // 2]
            sq = ops.pad(x * x, pad)
            s = None
            for i in range(n):
                part = sq[..., i:i + c] if self.channels_last else sq[:, i:i + c]
                s = part if s is None else s + part
            return x * ops.power(self.k + self.alpha * s, -self.beta)

    class ChannelShuffle(keras.layers.Layer):
        def __init__(self, groups, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.groups, self.channels_last = groups, channels_last

        def call(self, x):
            g = self.groups
            if self.channels_last:
                _, h, w, c = x.shape
                y = ops.reshape(x, (-1, h, w, g, c // g))
                y = ops.transpose(y, (0, 1, 2, 4, 3))
                return ops.reshape(y, (-1, h, w, c))
            _, c, h, w = x.shape
            y = ops.reshape(x, (-1, g, c // g, h, w))
            y = ops.transpose(y, (0, 2, 1, 3, 4))
            return ops.reshape(y, (-1, c, h, w))

    class ChannelSlice(keras.layers.Layer):
        def __init__(self, start, stop, axis, **kwargs):
            super().__init__(**kwargs)
            self.start, self.stop, self.axis = start, stop, axis

        def call(self, x):
            if self.axis == 1:
                return x[:, self.start:self.stop]
            return x[..., self.start:self.stop]

    _GENERIC = Namespace(Conv2D=keras.layers.Conv2D, DepthwiseConv2D=keras.layers.DepthwiseConv2D,
                         BatchNorm=BatchNorm, Dropout=Dropout, DropPath=DropPath, Pad=Pad, Pool=Pool,
                         Rescale=Rescale, AdaptiveAvgPool=AdaptiveAvgPool, LRN=LRN, ChannelShuffle=ChannelShuffle,
                         ChannelSlice=ChannelSlice)
    return _GENERIC


# --------------------------------------------------------------------------- op builders


class _Ctx:
    """Build state: layout, dtype policy, unique layer names, canonical parameter map."""

    def __init__(self, channels_last: bool, dtype, layers, label: str, strided_dilation: bool, same_avgpool: bool):
        self.cl = channels_last
        self.dtype = dtype
        self.L = layers  # the layer classes (generic_layers() or a backend's overrides)
        self.label = label  # the backend's name, for error messages
        self.strided_dilation = strided_dilation  # convolutions may combine stride > 1 and dilation > 1
        self.same_avgpool = same_avgpool  # Keras' "same" average pooling excludes the pads from the divisor
        self.names: set[str] = set()
        self.params: dict[str, tuple] = {}  # canonical name -> (variable, to_native, from_native)
        self.layers: dict[str, Any] = {}  # node name -> its main layer
        self.data_format = "channels_last" if channels_last else "channels_first"

    def name(self, base: str) -> str:
        """A unique layer name: the node's, with "." as "_" (Keras on torch keeps variables
        in a torch ParameterDict, whose keys cannot contain ".")."""
        base = base.replace(".", "_")
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def kw(self, base: str) -> dict:
        return {"name": self.name(base), "dtype": self.dtype}

    def chan_axis(self, shape) -> int:
        return (-1 if self.cl else 1) if len(shape) == 3 else -1

    def native_hw(self, hw_map: np.ndarray) -> np.ndarray:
        """(Ho, Wo) -> broadcastable (1, Ho, Wo, 1) or (1, 1, Ho, Wo)."""
        return hw_map[None, :, :, None] if self.cl else hw_map[None, None, :, :]


def _conv(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    C, H, W = shapes[0]
    O, g = a["out_channels"], a["groups"]
    (kh, kw), (sh, sw), (dh, dw) = a["kernel"], a["stride"], a["dilation"]
    t, b, l, r = a["pad"]
    if max(sh, sw) > 1 and max(dh, dw) > 1 and not ctx.strided_dilation:
        raise UnsupportedError(f"{ctx.label} backend: {node.name}: convolutions cannot combine stride > 1 with dilation > 1 "
                               "here")
    x = xs[0]
    if (t, b) == same_pads(H, kh, sh, dh) and (l, r) == same_pads(W, kw, sw, dw) and (t, b, l, r) != (0, 0, 0, 0):
        padding = "same"
    else:
        padding = "valid"
        if (t, b, l, r) != (0, 0, 0, 0):
            x = keras.layers.ZeroPadding2D(((t, b), (l, r)), data_format=ctx.data_format,
                                           **ctx.kw(node.name + ".pad"))(x)
    common = dict(strides=(sh, sw), padding=padding, dilation_rate=(dh, dw), use_bias=a["bias"],
                  data_format=ctx.data_format, **ctx.kw(node.name))
    if g == C and g > 1:
        mult = O // C
        layer = ctx.L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, **common)
        y = layer(x)
        kernel = layer.kernel
        to_native = lambda w, C=C, m=mult: w.reshape(C, m, w.shape[2], w.shape[3]).transpose(2, 3, 0, 1)
        from_native = lambda k, C=C, m=mult: k.transpose(2, 3, 0, 1).reshape(C * m, 1, k.shape[0], k.shape[1])
    else:
        layer = ctx.L.Conv2D(O, (kh, kw), groups=g, **common)
        y = layer(x)
        kernel = layer.kernel
        to_native = lambda w: w.transpose(2, 3, 1, 0)
        from_native = lambda k: k.transpose(3, 2, 0, 1)
    ctx.params[node.name + ".weight"] = (kernel, to_native, from_native)
    if a["bias"]:
        ctx.params[node.name + ".bias"] = (layer.bias, None, None)
    ctx.layers[node.name] = layer
    return y


def _linear(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    layer = keras.layers.Dense(a["out_features"], use_bias=a["bias"], **ctx.kw(node.name))
    y = layer(xs[0])
    ctx.params[node.name + ".weight"] = (layer.kernel, lambda w: w.T, lambda k: k.T)
    if a["bias"]:
        ctx.params[node.name + ".bias"] = (layer.bias, None, None)
    ctx.layers[node.name] = layer
    return y


def _batchnorm(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    layer = ctx.L.BatchNorm(a["momentum"], axis=ctx.chan_axis(shapes[0]), epsilon=a["eps"], center=a["center"],
                            scale=a["scale"], **ctx.kw(node.name))
    y = layer(xs[0])
    if a["scale"]:
        ctx.params[node.name + ".weight"] = (layer.gamma, None, None)
    if a["center"]:
        ctx.params[node.name + ".bias"] = (layer.beta, None, None)
    ctx.params[node.name + ".running_mean"] = (layer.moving_mean, None, None)
    ctx.params[node.name + ".running_var"] = (layer.moving_variance, None, None)
    ctx.layers[node.name] = layer
    return y


def _pool(node, xs, shapes, ctx: _Ctx, kind: str):
    a = node.attrs
    C, H, W = shapes[0]
    _, Ho, Wo = node.shape
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    t, b, l, r = a["pad"]
    eh = max((Ho - 1) * sh + kh - (H + t + b), 0)  # ceil-mode overhang, bottom/right
    ew = max((Wo - 1) * sw + kw - (W + l + r), 0)
    eff = (t, b + eh, l, r + ew)
    same_ok = (eff[:2] == same_pads(H, kh, sh) and eff[2:] == same_pads(W, kw, sw)
               and (Ho, Wo) == (-(-H // sh), -(-W // sw)))
    factor = None
    if kind == "avg":
        div = avgpool_divisor((H, W), a, (Ho, Wo))
        same_ok = same_ok and ctx.same_avgpool
        if same_ok:
            tf_same = avgpool_divisor((H, W), {**a, "pad": eff, "count_include_pad": False}, (Ho, Wo))
            same_ok = np.array_equal(tf_same, div)
        if not same_ok and not np.all(div == kh * kw):
            factor = ctx.native_hw(kh * kw / div)  # float64 numpy, cast to the activation's dtype
    x = xs[0]
    if same_ok and eff != (0, 0, 0, 0):
        padding = "SAME"
    else:
        padding = "VALID"
        if eff != (0, 0, 0, 0):
            if kind == "max":
                x = ctx.L.Pad(eff, -math.inf, ctx.cl, **ctx.kw(node.name + ".pad"))(x)
            else:
                x = keras.layers.ZeroPadding2D(((eff[0], eff[1]), (eff[2], eff[3])), data_format=ctx.data_format,
                                               **ctx.kw(node.name + ".pad"))(x)
        Hp, Wp = H + eff[0] + eff[1], W + eff[2] + eff[3]
        if ((Hp - kh) // sh + 1, (Wp - kw) // sw + 1) != (Ho, Wo):
            raise UnsupportedError(f"{ctx.label} backend: {node.name}: pooling output size mismatch (internal)")
    if ctx.cl:
        cls = keras.layers.MaxPooling2D if kind == "max" else keras.layers.AveragePooling2D
        layer = cls((kh, kw), (sh, sw), padding=padding.lower(), data_format=ctx.data_format, **ctx.kw(node.name))
        y = layer(x)
        if factor is not None:
            y = ctx.L.Rescale(factor, **ctx.kw(node.name + ".divisor"))(y)
        return y
    return ctx.L.Pool(kind, (kh, kw), (sh, sw), padding, False, factor, **ctx.kw(node.name))(x)


def _adaptive(node, xs, shapes, ctx: _Ctx):
    C, H, W = shapes[0]
    oh, ow = node.attrs["output_size"]
    if (oh, ow) == (1, 1):
        return keras.layers.GlobalAveragePooling2D(data_format=ctx.data_format, keepdims=True,
                                                   **ctx.kw(node.name))(xs[0])
    if H % oh == 0 and W % ow == 0:
        k = (H // oh, W // ow)
        if k == (1, 1):
            return keras.layers.Identity(**ctx.kw(node.name))(xs[0])
        if ctx.cl:
            return keras.layers.AveragePooling2D(k, k, padding="valid", data_format=ctx.data_format,
                                                 **ctx.kw(node.name))(xs[0])
        return ctx.L.Pool("avg", k, k, "VALID", False, None, **ctx.kw(node.name))(xs[0])
    return ctx.L.AdaptiveAvgPool(adaptive_pool_matrix(H, oh), adaptive_pool_matrix(W, ow), ctx.cl,
                              **ctx.kw(node.name))(xs[0])


def _flatten(node, xs, shapes, ctx: _Ctx):
    x = xs[0]
    s = shapes[0]
    if ctx.cl and len(s) == 3 and s[0] > 1 and s[1] * s[2] > 1:
        x = keras.layers.Permute((3, 1, 2), **ctx.kw(node.name + ".to_chw"))(x)
    return keras.layers.Flatten(data_format="channels_last", **ctx.kw(node.name))(x)


def _dropout(node, xs, shapes, ctx: _Ctx):
    layer = ctx.L.Dropout(node.attrs["rate"], **ctx.kw(node.name))
    ctx.layers[node.name] = layer
    return layer(xs[0])


def _drop_path(node, xs, shapes, ctx: _Ctx):
    layer = ctx.L.DropPath(node.attrs["rate"], **ctx.kw(node.name))
    ctx.layers[node.name] = layer
    return layer(xs[0])


def _lrn(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    return ctx.L.LRN(a["size"], a["alpha"], a["beta"], a["k"], ctx.cl, **ctx.kw(node.name))(xs[0])


def _channel_split(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    step = shapes[0][0] // a["parts"]
    axis = ctx.chan_axis(shapes[0])
    return ctx.L.ChannelSlice(a["index"] * step, (a["index"] + 1) * step, 1 if axis == 1 else -1,
                           **ctx.kw(node.name))(xs[0])


def _mul(node, xs, shapes, ctx: _Ctx):
    if len(shapes[0]) != len(shapes[1]):
        raise UnsupportedError(f"{ctx.label} backend: {node.name}: mul of inputs of different ranks")
    return keras.layers.Multiply(**ctx.kw(node.name))(list(xs))


def _act(make):
    return lambda node, xs, shapes, ctx: make(node.attrs, ctx.kw(node.name))(xs[0])


BUILDERS = {
    "conv2d": _conv,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "relu": _act(lambda a, kw: keras.layers.ReLU(**kw)),
    "relu6": _act(lambda a, kw: keras.layers.ReLU(max_value=6.0, **kw)),
    "leaky_relu": _act(lambda a, kw: keras.layers.LeakyReLU(negative_slope=a["negative_slope"], **kw)),
    "sigmoid": _act(lambda a, kw: keras.layers.Activation("sigmoid", **kw)),
    "tanh": _act(lambda a, kw: keras.layers.Activation("tanh", **kw)),
    "hardswish": _act(lambda a, kw: keras.layers.Activation("hard_swish", **kw)),
    "hardsigmoid": _act(lambda a, kw: keras.layers.Activation("hard_sigmoid", **kw)),
    "silu": _act(lambda a, kw: keras.layers.Activation("silu", **kw)),
    "softmax": lambda n, xs, s, ctx: keras.layers.Softmax(axis=ctx.chan_axis(s[0]), **ctx.kw(n.name))(xs[0]),
    "maxpool2d": lambda n, xs, s, ctx: _pool(n, xs, s, ctx, "max"),
    "avgpool2d": lambda n, xs, s, ctx: _pool(n, xs, s, ctx, "avg"),
    "adaptive_avgpool2d": _adaptive,
    "global_avgpool": lambda n, xs, s, ctx: keras.layers.GlobalAveragePooling2D(
        data_format=ctx.data_format, keepdims=True, **ctx.kw(n.name))(xs[0]),
    "flatten": _flatten,
    "dropout": _dropout,
    "drop_path": _drop_path,
    "lrn": _lrn,
    "concat": lambda n, xs, s, ctx: keras.layers.Concatenate(axis=ctx.chan_axis(s[0]), **ctx.kw(n.name))(list(xs)),
    "add": lambda n, xs, s, ctx: keras.layers.Add(**ctx.kw(n.name))(list(xs)),
    "mul": _mul,
    "scale": lambda n, xs, s, ctx: ctx.L.Rescale(n.attrs["factor"], **ctx.kw(n.name))(xs[0]),
    "channel_shuffle": lambda n, xs, s, ctx: ctx.L.ChannelShuffle(n.attrs["groups"], ctx.cl, **ctx.kw(n.name))(xs[0]),
    "channel_split": _channel_split,
    "identity": lambda n, xs, s, ctx: keras.layers.Identity(**ctx.kw(n.name))(xs[0]),
    "zeropad2d": lambda n, xs, s, ctx: keras.layers.ZeroPadding2D(
        ((n.attrs["pad"][0], n.attrs["pad"][1]), (n.attrs["pad"][2], n.attrs["pad"][3])),
        data_format=ctx.data_format, **ctx.kw(n.name))(xs[0]),
}




# --------------------------------------------------------------------------- the model


class KerasModel:
    """A built IR: the Keras models, canonical parameter map and mask layers.

    ``train_model`` has every output (main and aux heads); ``eval_model`` shares its layers
    and has the main output only, so train-only nodes never run in inference.
    """

    def __init__(self, ir, channels_last: bool, policy: str, layers: Namespace, label: str,
                 strided_dilation: bool = True, same_avgpool: bool = True):
        ctx = _Ctx(channels_last, keras.DTypePolicy(policy), layers, label, strided_dilation, same_avgpool)
        self.ir, self.channels_last = ir, channels_last
        inp = keras.Input(shape=self.native_shape(ir.input_shape), name=ctx.name("input"), dtype="float32")
        vals = {ir.nodes[0].name: inp}
        for node in ir.nodes[1:]:
            if node.op not in BUILDERS:
                raise UnsupportedError(f"{label} backend: op {node.op} not implemented")
            shapes = [ir.node(s).shape for s in node.inputs]
            vals[node.name] = BUILDERS[node.op](node, [vals[s] for s in node.inputs], shapes, ctx)
        outs = [vals[o.node] for o in ir.outputs]
        self.train_model = keras.Model(inp, outs, name=f"{ir.name}_train")
        self.eval_model = keras.Model(inp, outs[0], name=ir.name)
        missing = set(ir.params) - set(ctx.params)
        if missing:
            raise UnsupportedError(f"{label} backend: parameters without a variable: {sorted(missing)[:5]}")
        self.params = {name: ctx.params[name] for name in ir.params}
        self.mask_layers = {name: layer for name, layer in ctx.layers.items()
                            if isinstance(layer, (layers.Dropout, layers.DropPath))}
        self.aux_weights = [float(o.weight) for o in ir.outputs[1:]]

    def native_shape(self, shape):
        if len(shape) == 3 and self.channels_last:
            return (shape[1], shape[2], shape[0])
        return tuple(shape)

    def to_native(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 4 and self.channels_last:
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return np.ascontiguousarray(x)

    def from_native(self, y: np.ndarray) -> np.ndarray:
        if y.ndim == 4 and self.channels_last:
            return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
        return y

    def set_weights(self, weights) -> None:
        for name, (var, to_native, _) in self.params.items():
            w = np.asarray(weights[name], dtype=np.float32)
            if w.shape != self.ir.params[name].shape:
                raise ValueError(f"{name}: shape {w.shape} != {self.ir.params[name].shape}")
            var.assign(np.ascontiguousarray(to_native(w) if to_native else w))

    def get_weights(self, to_numpy) -> dict[str, np.ndarray]:
        """The canonical weights; ``to_numpy`` reads a Keras variable in the backend's way
        (keras.ops.convert_to_numpy goes through numpy's deprecated __array__ protocol)."""
        out = {}
        for name, (var, _, from_native) in self.params.items():
            v = np.asarray(to_numpy(var)).astype(np.float32)
            out[name] = np.ascontiguousarray(from_native(v) if from_native else v).copy()
        return out

    def param_counts(self) -> tuple[int, int]:
        def count(ws):
            return int(sum(int(np.prod(w.shape)) for w in ws))

        return count(self.train_model.trainable_weights), count(self.train_model.non_trainable_weights)

    def set_masks(self, masks: dict[str, np.ndarray] | None, constant) -> None:
        """Fixes the dropout/drop_path keep-masks; ``constant`` makes a framework tensor."""
        for name, layer in self.mask_layers.items():
            m = masks.get(name) if masks else None
            if m is None:
                layer.fixed_mask = None
                continue
            m = np.asarray(m, dtype=np.float32)
            if m.ndim == 4:  # dropout masks follow the activation's layout
                m = self.to_native(m)
            layer.fixed_mask = constant(m)


# --------------------------------------------------------------------------- Keras on another framework


class GenericKerasBackend(Backend):
    """What the backends running Keras on another framework share (keras-torch, keras-jax):
    the generic layers, Keras' own BatchNormalization (biased running variance), the layout
    option and the weight and count plumbing of ``self.model`` (a KerasModel)."""

    framework = "keras"
    distribution = "keras"
    options = {"layout": ("channels_last", "channels_first")}
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"
    keras_backend: ClassVar[str]  # Keras' name of the framework, also its module: "torch", "jax"

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("keras", cls.keras_backend))

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        return {"KERAS_BACKEND": cls.keras_backend, **super().env_vars(threads, tuned)}

    def version(self) -> str:
        framework = importlib.import_module(self.keras_backend)
        return f"keras {keras.__version__}, {self.keras_backend} {framework.__version__}"

    def resolve_build(self, config):
        """The start of build(): config resolved, device kind and index (no Ascend here)."""
        gc.collect()  # Keras functional graphs are reference cycles (see the tf backend)
        config = self.resolve_config(config)
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError(f"{self.name} backend: Ascend devices are not supported")
        return config, kind, index

    @staticmethod
    def outputs(out) -> list:
        """A Keras model's output(s) as a list."""
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def build_model(self, ir, config, keras_device: str, **builder_options) -> None:
        """Builds ``self.model`` from the generic layers on ``keras_device``."""
        with keras.device(keras_device):
            self.model = KerasModel(ir, config.options["layout"] == "channels_last", POLICIES[config.precision],
                                    generic_layers(), self.name, **builder_options)

    def set_weights(self, weights) -> None:
        self.model.set_weights(weights)

    def param_counts(self):
        return self.model.param_counts()
