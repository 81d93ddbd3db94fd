"""TensorFlow / Keras 3 backend: the IR as a Keras functional model, tf.function, XLA or eager.

Layout and conventions (harness/ops.py holds the canonical ones):
    * Activations are NHWC by default (``layout=channels_last``, what Keras users run and
      what TF's CPU kernels are written for); ``channels_first`` builds NCHW layers
      (``data_format="channels_first"``). forward() always takes and returns canonical
      NCHW / (N, F) numpy; to_device() transposes a batch once, before any timing.
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
    * BatchNorm is a keras.layers.BatchNormalization (same variables, names and counts) whose
      call runs TF's fused kernel, FusedBatchNormV3, with ``exponential_avg_factor`` = the
      IR's (PyTorch-sense) momentum: that kernel updates running = (1 - m) * running +
      m * batch with the *unbiased* batch variance and normalises with the biased one, which
      is exactly the IR's rule, so ``bn_variance = "unbiased"``. The Keras momentum is set to
      1 - m for the record. (Keras 3's own BN call is unfused and updates with the biased
      variance.) eps is passed to the raw op as is (tf.nn.fused_batch_norm would raise it to
      1.001e-5).
    * LRN: tf.nn.local_response_normalization (depth_radius = (n - 1) / 2, alpha as is) for
      odd n in NHWC; even n or NCHW use an exact window sum of squares (n // 2 channels
      before, (n - 1) // 2 after).
    * The train step is one function (tf.function, optionally jit_compile) that runs the
      forward with GradientTape, the loss of harness.backend's contract (mean sparse CE +
      weighted aux CE), adds L2 weight decay to each gradient and applies PyTorch's momentum
      rule with TF's fused ResourceApplyMomentum (accum = m * accum + g; w -= lr * accum).
      Keras optimizers are not used: their weight_decay is decoupled and their momentum
      form differs in rounding.
    * Layout channels_first runs wherever TF has NCHW kernels. On this CPU build (oneDNN)
      conv, depthwise, pooling and fused BN accept NCHW in graph and XLA mode; in eager
      mode the CPU MaxPoolGrad kernel is NHWC-only, so an eager NCHW train step of a net
      with max pooling raises UnsupportedError. Nothing is silently transposed by this
      module (Keras itself transposes NCHW pooling on TF, which is why pooling here calls
      tf.nn directly in channels_first).
"""

from __future__ import annotations

from dataclasses import replace

import gc
import math
import os
from typing import Any

import numpy as np

from harness.backend import Backend, BuildConfig, split_device
from harness.errors import UnsupportedError
from harness.ops import adaptive_pool_matrix, avgpool_divisor, same_pads

tf = None
keras = None

MB = 1024 * 1024
POLICIES = {"fp32": "float32", "tf32": "float32", "amp-bf16": "mixed_bfloat16", "amp-fp16": "mixed_float16"}
"""Keras dtype policy per precision. (Verification scripts may map fp32 to "float64": every
layer here, BN included via an unfused path, then runs in float64.)"""
_L: Any = None  # namespace of the custom layer classes, defined once keras is imported


def _import():
    global tf, keras
    if tf is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as _tf
    import keras as _keras

    if not _keras.__version__.startswith("3"):
        raise UnsupportedError(f"tf backend needs Keras 3, found keras {_keras.__version__}")
    if _keras.backend.backend() != "tensorflow":
        raise UnsupportedError(f"tf backend: Keras runs on '{_keras.backend.backend()}' (set KERAS_BACKEND=tensorflow)")
    tf, keras = _tf, _keras
    _define_layers()


# --------------------------------------------------------------------------- custom layers


def _define_layers():
    """Layer classes need keras.layers at class-creation time."""
    global _L
    if _L is not None:
        return

    class BatchNorm(keras.layers.BatchNormalization):
        """Keras BN (same variables and counts) running TF's fused kernel with the IR's rule."""

        def __init__(self, torch_momentum: float, **kwargs):
            super().__init__(momentum=1.0 - torch_momentum, **kwargs)
            self.torch_momentum = float(torch_momentum)

        def call(self, inputs, training=None, mask=None):
            x = inputs
            flat = len(x.shape) == 2
            c = x.shape[-1] if (flat or self.axis in (-1, 3)) else x.shape[1]
            if flat:
                x = tf.reshape(x, (-1, 1, 1, c))
            fmt = "NHWC" if flat or self.axis in (-1, 3) else "NCHW"
            if x.dtype == tf.float64:  # no fused kernel for doubles (verification runs only)
                y = self._call_unfused(x, training)
                return tf.reshape(y, (-1, c)) if flat else y
            scale = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((c,), tf.float32)
            offset = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((c,), tf.float32)
            mean = tf.convert_to_tensor(self.moving_mean)
            var = tf.convert_to_tensor(self.moving_variance)
            if training and self.trainable:
                y, new_mean, new_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=scale, offset=offset, mean=mean, variance=var, epsilon=self.epsilon,
                    exponential_avg_factor=self.torch_momentum, data_format=fmt, is_training=True)
                self.moving_mean.assign(new_mean)
                self.moving_variance.assign(new_var)
            else:
                y = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=mean, variance=var,
                                                epsilon=self.epsilon, data_format=fmt, is_training=False)[0]
            if flat:
                y = tf.reshape(y, (-1, c))
            return tf.cast(y, self.compute_dtype)

        def _call_unfused(self, x, training):
            axes = [0, 1, 2] if (len(x.shape) == 2 or self.axis in (-1, 3)) else [0, 2, 3]
            shape = [1, 1, 1, -1] if axes == [0, 1, 2] else [1, -1, 1, 1]
            if training and self.trainable:
                mean, var = tf.nn.moments(x, axes)
                n = tf.cast(tf.size(x) // tf.size(mean), x.dtype)
                m = self.torch_momentum
                self.moving_mean.assign((1 - m) * self.moving_mean + m * mean)
                self.moving_variance.assign((1 - m) * self.moving_variance + m * var * n / tf.maximum(n - 1, 1))
            else:
                mean, var = tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance)
            y = (x - tf.reshape(mean, shape)) / tf.sqrt(tf.reshape(var, shape) + self.epsilon)
            if self.scale:
                y = y * tf.reshape(self.gamma, shape)
            if self.center:
                y = y + tf.reshape(self.beta, shape)
            return y

    class Conv2D(keras.layers.Conv2D):
        """Keras Conv2D with the bias added by tf.nn.bias_add in the layer's own data format.

        keras.ops.add (Keras 3.15) turns "x + bias" into BiasAdd and guesses the channel axis
        from the shapes: channels_first with W == filters gets the bias added along W.
        """

        def call(self, inputs):
            y = self.convolution_op(inputs, self.kernel)
            if self.use_bias:
                y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
            return y

    class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
        """Keras DepthwiseConv2D, bias added as in Conv2D above."""

        def call(self, inputs):
            y = keras.ops.depthwise_conv(inputs, self.kernel, strides=self.strides, padding=self.padding,
                                         dilation_rate=self.dilation_rate, data_format=self.data_format)
            if self.use_bias:
                y = tf.nn.bias_add(y, self.bias, data_format="NHWC" if self.data_format == "channels_last" else "NCHW")
            return y

    class Dropout(keras.layers.Dropout):
        """Keras Dropout; a fixed keep-mask (native layout) can be set for parity runs."""

        fixed_mask = None

        def call(self, inputs, training=False):
            if training and self.rate > 0 and self.fixed_mask is not None:
                return inputs * tf.cast(self.fixed_mask, inputs.dtype) / (1.0 - self.rate)
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
                keep = tf.reshape(tf.cast(self.fixed_mask, inputs.dtype), shape)
            else:
                n = tf.shape(inputs)[0]
                u = keras.random.uniform((n,), seed=self.seed_generator)
                keep = tf.reshape(tf.cast(u >= self.rate, inputs.dtype), shape)
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
            return tf.pad(x, self.paddings, constant_values=tf.cast(self.value, x.dtype))

    class Pool(keras.layers.Layer):
        """tf.nn max/avg pooling, valid or same, in either layout (Keras' own pooling layers
        transpose NCHW on TF; used only for channels_first), then an optional constant
        factor map (average pooling divisor correction)."""

        def __init__(self, kind, kernel, stride, padding, channels_last, factor=None, **kwargs):
            super().__init__(**kwargs)
            self.kind, self.kernel, self.stride, self.padding = kind, tuple(kernel), tuple(stride), padding
            self.fmt = "NHWC" if channels_last else "NCHW"
            self.factor = factor  # numpy (1, Ho, Wo, 1) / (1, 1, Ho, Wo) or None

        def call(self, x):
            f = tf.nn.max_pool2d if self.kind == "max" else tf.nn.avg_pool2d
            y = f(x, self.kernel, self.stride, self.padding, data_format=self.fmt)
            if self.factor is not None:
                y = y * tf.constant(self.factor, y.dtype)
            return y

    class Rescale(keras.layers.Layer):
        """y = x * constant (a scalar or a broadcastable constant map)."""

        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * tf.constant(self.factor, x.dtype)

    class AdaptiveAvgPool(keras.layers.Layer):
        """PyTorch adaptive average pooling via its exact (n_out, n_in) averaging matrices."""

        def __init__(self, mh, mw, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.mh, self.mw = mh.astype(np.float32), mw.astype(np.float32)
            self.eq = "nhwc,ih,jw->nijc" if channels_last else "nchw,ih,jw->ncij"

        def call(self, x):
            return tf.einsum(self.eq, x, tf.constant(self.mh, x.dtype), tf.constant(self.mw, x.dtype))

    class LRN(keras.layers.Layer):
        """b_c = a_c / (k + alpha * sum_{c-floor(n/2)}^{c+ceil(n/2)-1} a^2)^beta (paper form)."""

        def __init__(self, size, alpha, beta, k, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
            self.channels_last = channels_last

        def call(self, x):
            n = self.size
            if self.channels_last and n % 2 == 1 and x.dtype == tf.float32:
                return tf.nn.local_response_normalization(x, depth_radius=(n - 1) // 2, bias=self.k,
                                                          alpha=self.alpha, beta=self.beta)
            axis = 3 if self.channels_last else 1
            c = x.shape[axis]
            sq = x * x
            pad = [[0, 0]] * 4
            pad[axis] = [n // 2, (n - 1) // 2]
            sq = tf.pad(sq, pad)
            s = None
            for i in range(n):
                part = sq[..., i:i + c] if self.channels_last else sq[:, i:i + c]
                s = part if s is None else s + part
            return x * tf.pow(self.k + self.alpha * s, -self.beta)

    class ChannelShuffle(keras.layers.Layer):
        def __init__(self, groups, channels_last, **kwargs):
            super().__init__(**kwargs)
            self.groups, self.channels_last = groups, channels_last

        def call(self, x):
            g = self.groups
            if self.channels_last:
                _, h, w, c = x.shape
                y = tf.reshape(x, (-1, h, w, g, c // g))
                y = tf.transpose(y, (0, 1, 2, 4, 3))
                return tf.reshape(y, (-1, h, w, c))
            _, c, h, w = x.shape
            y = tf.reshape(x, (-1, g, c // g, h, w))
            y = tf.transpose(y, (0, 2, 1, 3, 4))
            return tf.reshape(y, (-1, c, h, w))

    class ChannelSlice(keras.layers.Layer):
        def __init__(self, start, stop, axis, **kwargs):
            super().__init__(**kwargs)
            self.start, self.stop, self.axis = start, stop, axis

        def call(self, x):
            if self.axis == 1:
                return x[:, self.start:self.stop]
            return x[..., self.start:self.stop]

    class _NS:
        pass

    ns = _NS()
    for cls in (Conv2D, DepthwiseConv2D, BatchNorm, Dropout, DropPath, Pad, Pool, Rescale, AdaptiveAvgPool, LRN, ChannelShuffle, ChannelSlice):
        setattr(ns, cls.__name__, cls)
    _L = ns


# --------------------------------------------------------------------------- op builders


class _Ctx:
    """Build state: layout, dtype policy, unique layer names, canonical parameter map."""

    def __init__(self, channels_last: bool, dtype):
        self.cl = channels_last
        self.dtype = dtype
        self.names: set[str] = set()
        self.params: dict[str, tuple] = {}  # canonical name -> (variable, to_native, from_native)
        self.layers: dict[str, Any] = {}  # node name -> its main layer
        self.data_format = "channels_last" if channels_last else "channels_first"

    def name(self, base: str) -> str:
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
    if max(sh, sw) > 1 and max(dh, dw) > 1:
        raise UnsupportedError(f"tf backend: {node.name}: TensorFlow convolutions cannot combine stride > 1 "
                               "with dilation > 1")
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
        layer = _L.DepthwiseConv2D((kh, kw), depth_multiplier=mult, **common)
        y = layer(x)
        kernel = layer.kernel
        to_native = lambda w, C=C, m=mult: w.reshape(C, m, w.shape[2], w.shape[3]).transpose(2, 3, 0, 1)
        from_native = lambda k, C=C, m=mult: k.transpose(2, 3, 0, 1).reshape(C * m, 1, k.shape[0], k.shape[1])
    else:
        layer = _L.Conv2D(O, (kh, kw), groups=g, **common)
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
    layer = _L.BatchNorm(a["momentum"], axis=ctx.chan_axis(shapes[0]), epsilon=a["eps"], center=a["center"],
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
        if same_ok:
            tf_same = avgpool_divisor((H, W), {**a, "pad": eff, "count_include_pad": False}, (Ho, Wo))
            same_ok = np.array_equal(tf_same, div)
        if not same_ok and not np.all(div == kh * kw):
            factor = ctx.native_hw((kh * kw / div).astype(np.float32))
    x = xs[0]
    if same_ok and eff != (0, 0, 0, 0):
        padding = "SAME"
    else:
        padding = "VALID"
        if eff != (0, 0, 0, 0):
            if kind == "max":
                x = _L.Pad(eff, -math.inf, ctx.cl, **ctx.kw(node.name + ".pad"))(x)
            else:
                x = keras.layers.ZeroPadding2D(((eff[0], eff[1]), (eff[2], eff[3])), data_format=ctx.data_format,
                                               **ctx.kw(node.name + ".pad"))(x)
        Hp, Wp = H + eff[0] + eff[1], W + eff[2] + eff[3]
        if ((Hp - kh) // sh + 1, (Wp - kw) // sw + 1) != (Ho, Wo):
            raise UnsupportedError(f"tf backend: {node.name}: pooling output size mismatch (internal)")
    if ctx.cl:
        cls = keras.layers.MaxPooling2D if kind == "max" else keras.layers.AveragePooling2D
        layer = cls((kh, kw), (sh, sw), padding=padding.lower(), data_format=ctx.data_format, **ctx.kw(node.name))
        y = layer(x)
        if factor is not None:
            y = _L.Rescale(factor, **ctx.kw(node.name + ".divisor"))(y)
        return y
    return _L.Pool(kind, (kh, kw), (sh, sw), padding, False, factor, **ctx.kw(node.name))(x)


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
        return _L.Pool("avg", k, k, "VALID", False, None, **ctx.kw(node.name))(xs[0])
    return _L.AdaptiveAvgPool(adaptive_pool_matrix(H, oh), adaptive_pool_matrix(W, ow), ctx.cl,
                              **ctx.kw(node.name))(xs[0])


def _flatten(node, xs, shapes, ctx: _Ctx):
    x = xs[0]
    s = shapes[0]
    if ctx.cl and len(s) == 3 and s[0] > 1 and s[1] * s[2] > 1:
        x = keras.layers.Permute((3, 1, 2), **ctx.kw(node.name + ".to_chw"))(x)
    return keras.layers.Flatten(data_format="channels_last", **ctx.kw(node.name))(x)


def _dropout(node, xs, shapes, ctx: _Ctx):
    layer = _L.Dropout(node.attrs["rate"], **ctx.kw(node.name))
    ctx.layers[node.name] = layer
    return layer(xs[0])


def _drop_path(node, xs, shapes, ctx: _Ctx):
    layer = _L.DropPath(node.attrs["rate"], **ctx.kw(node.name))
    ctx.layers[node.name] = layer
    return layer(xs[0])


def _lrn(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    return _L.LRN(a["size"], a["alpha"], a["beta"], a["k"], ctx.cl, **ctx.kw(node.name))(xs[0])


def _channel_split(node, xs, shapes, ctx: _Ctx):
    a = node.attrs
    step = shapes[0][0] // a["parts"]
    axis = ctx.chan_axis(shapes[0])
    return _L.ChannelSlice(a["index"] * step, (a["index"] + 1) * step, 1 if axis == 1 else -1,
                           **ctx.kw(node.name))(xs[0])


def _mul(node, xs, shapes, ctx: _Ctx):
    if len(shapes[0]) != len(shapes[1]):
        raise UnsupportedError(f"tf backend: {node.name}: mul of inputs of different ranks")
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
    "scale": lambda n, xs, s, ctx: _L.Rescale(n.attrs["factor"], **ctx.kw(n.name))(xs[0]),
    "channel_shuffle": lambda n, xs, s, ctx: _L.ChannelShuffle(n.attrs["groups"], ctx.cl, **ctx.kw(n.name))(xs[0]),
    "channel_split": _channel_split,
    "identity": lambda n, xs, s, ctx: keras.layers.Identity(**ctx.kw(n.name))(xs[0]),
    "zeropad2d": lambda n, xs, s, ctx: keras.layers.ZeroPadding2D(
        ((n.attrs["pad"][0], n.attrs["pad"][1]), (n.attrs["pad"][2], n.attrs["pad"][3])),
        data_format=ctx.data_format, **ctx.kw(n.name))(xs[0]),
}


# --------------------------------------------------------------------------- backend


class KerasTFBackend(Backend):
    """TensorFlow 2 + Keras 3 (``graph`` = tf.function, ``xla`` = jit_compile, ``eager``)."""

    name = "tf"
    framework = "tensorflow"
    distribution = "tensorflow-cpu"
    exec_modes = ("graph", "xla", "eager")
    options = {"layout": ("channels_last", "channels_first")}
    known_gaps: dict[str, str] = {}
    bn_variance = "unbiased"
    DISTRIBUTIONS = ("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tensorflow-macos", "tf-nightly",
                     "tf-nightly-cpu")

    # ------------------------------------------------------------------ no framework

    @classmethod
    def installed_version(cls) -> str | None:
        from importlib import metadata

        for dist in cls.DISTRIBUTIONS:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    @classmethod
    def env_vars(cls, threads: int, tuned: bool) -> dict[str, str]:
        """Quiet logs and Keras on TF always; tuned: Intel/TF CPU guidance for the budget.

        TF's x86 wheels use oneDNN on an Eigen thread pool: TF_ENABLE_ONEDNN_OPTS=1 (the
        default on Linux x86 since 2.9, made explicit), intra-op threads = the core budget,
        inter-op threads = 1 (one socket: independent ops would only compete for the same
        cores). The OpenMP variables cover oneDNN builds that use OpenMP.
        """
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
        if tuned:
            n = str(threads)
            env.update(super().env_vars(threads, tuned))
            env.update({"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": n,
                        "TF_NUM_INTEROP_THREADS": str(cls._inter_threads(threads))})
        return env

    @staticmethod
    def _inter_threads(threads: int) -> int:
        return 1

    # ------------------------------------------------------------------ framework

    def import_framework(self) -> None:
        _import()

    def version(self) -> str:
        return tf.__version__

    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]

    def configure(self, threads: int, tuned: bool) -> dict[str, Any]:
        applied = True
        if tuned:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(self._inter_threads(threads))
            except RuntimeError:  # the TF context already exists: settings are fixed now
                applied = False
        growth = []
        for gpu in tf.config.list_physical_devices("GPU"):
            try:  # allocate as needed, so process memory figures mean something
                tf.config.experimental.set_memory_growth(gpu, True)
                growth.append(True)
            except RuntimeError:
                growth.append(tf.config.experimental.get_memory_growth(gpu))
        return {
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "threads_applied": applied,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for Linux x86)"),
            "keras_version": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "gpu_memory_growth": growth,
        }

    def build(self, ir, config: BuildConfig) -> None:
        # Keras functional graphs are reference cycles (layers <-> nodes); a model dropped by
        # an earlier backend instance in this process is only freed by a collection, which
        # the allocation-count heuristic of the gc may not run for a long time.
        gc.collect()
        config = self.resolve_config(config)
        kind, index = split_device(config.device)
        if kind == "ascend":
            raise UnsupportedError("tf backend: Ascend devices are not supported")
        gpus = tf.config.list_physical_devices("GPU")
        if kind == "cuda":
            if not gpus:
                raise UnsupportedError("tf backend: TensorFlow sees no GPU here (tensorflow-cpu build, or no CUDA "
                                       "driver); install tensorflow[and-cuda] on a GPU machine")
            if index >= len(gpus):
                raise UnsupportedError(f"tf backend: no GPU {index} (TensorFlow sees {len(gpus)})")
        self.device = "/CPU:0" if kind == "cpu" else f"/GPU:{index}"
        self.gpu = kind == "cuda"
        self.gpu_name = f"GPU:{index}"
        prec = config.precision
        if prec == "tf32" and not self.gpu:
            raise UnsupportedError("tf backend: tf32 exists on CUDA only")
        if prec == "amp-fp16" and not self.gpu:
            raise UnsupportedError("tf backend: fp16 mixed precision is a GPU mode; use amp-bf16 on the CPU")
        if self.gpu:  # TF enables TF32 by default on Ampere+; fp32 means true fp32
            tf.config.experimental.enable_tensor_float_32_execution(prec == "tf32")
        policy = POLICIES[prec]
        self.loss_dtype = tf.float64 if policy == "float64" else tf.float32
        self.config, self.ir = config, ir
        self.mode = config.exec_mode
        self.channels_last = config.options.get("layout", "channels_last") == "channels_last"
        self.train_unsupported = None
        if (not self.channels_last and not self.gpu and self.mode == "eager"
                and any(n.op == "maxpool2d" for n in ir.nodes)):
            self.train_unsupported = ("tf backend: channels_first train step in eager mode on the CPU: TF's eager CPU "
                                      "MaxPoolGrad kernel supports NHWC only (use exec mode graph or xla)")
        ctx = _Ctx(self.channels_last, keras.DTypePolicy(policy))
        with tf.device(self.device):
            inp = keras.Input(shape=self._native_shape(ir.input_shape), name=ctx.name("input"), dtype="float32")
            vals = {ir.nodes[0].name: inp}
            for node in ir.nodes[1:]:
                if node.op not in BUILDERS:
                    raise UnsupportedError(f"tf backend: op {node.op} not implemented")
                shapes = [ir.node(s).shape for s in node.inputs]
                vals[node.name] = BUILDERS[node.op](node, [vals[s] for s in node.inputs], shapes, ctx)
            outs = [vals[o.node] for o in ir.outputs]
            self.train_model = keras.Model(inp, outs, name=f"{ir.name}_train")
            self.eval_model = keras.Model(inp, outs[0], name=ir.name)
        missing = set(ir.params) - set(ctx.params)
        if missing:
            raise UnsupportedError(f"tf backend: parameters without a variable: {sorted(missing)[:5]}")
        self.params = {name: ctx.params[name] for name in ir.params}
        self.mask_layers = {name: layer for name, layer in ctx.layers.items()
                            if isinstance(layer, (_L.Dropout, _L.DropPath))}
        self.aux_weights = [float(o.weight) for o in ir.outputs[1:]]
        self.tvars = list(self.train_model.trainable_weights)
        self.momentum_bufs = None  # made at the first train step (PyTorch's SGD makes them lazily too)
        self.loss_scale = None
        if prec == "amp-fp16":
            with tf.device(self.device):
                self.loss_scale = tf.Variable(2.0 ** 15, trainable=False)
                self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._last = None
        self._make_functions()

    def _native_shape(self, shape):
        if len(shape) == 3 and self.channels_last:
            return (shape[1], shape[2], shape[0])
        return tuple(shape)

    def _to_native(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 4 and self.channels_last:
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return np.ascontiguousarray(x)

    def _from_native(self, y: np.ndarray) -> np.ndarray:
        if y.ndim == 4 and self.channels_last:
            return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
        return y

    # functions ----------------------------------------------------------------

    def _compile(self, fn, signature):
        if self.mode == "eager":
            return fn
        return tf.function(fn, input_signature=signature, jit_compile=self.mode == "xla", reduce_retracing=True)

    def _make_functions(self):
        """(Re)traces the step functions (again after set_masks: masks are constants)."""
        xspec = tf.TensorSpec((None, *self._native_shape(self.ir.input_shape)), tf.float32)
        yspec = tf.TensorSpec((None,), tf.int64)
        device = self.device

        def infer(x):
            with tf.device(device):
                return self.eval_model(x, training=False)

        def forward_train(x):
            with tf.device(device):
                return self.train_model(x, training=True)

        def train(x, y):
            with tf.device(device):
                return self._train_body(x, y)

        self._infer = self._compile(infer, [xspec])
        self._forward_train = self._compile(forward_train, [xspec])
        self._train = self._compile(train, [xspec, yspec])

    def _loss(self, outs, y):
        def ce(logits):
            logits = tf.cast(logits, self.loss_dtype)
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

        loss = ce(outs[0])
        for o, w in zip(outs[1:], self.aux_weights):
            loss = loss + w * ce(o)
        return loss

    def _train_body(self, x, y):
        opt = self.config.optimizer
        if not self.tvars:  # nothing to learn: forward (BN statistics) and loss only
            outs = self.train_model(x, training=True)
            return self._loss(outs if isinstance(outs, (list, tuple)) else [outs], y)
        with tf.GradientTape() as tape:
            outs = self.train_model(x, training=True)
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            loss = self._loss(outs, y)
            scaled = loss * self.loss_scale if self.loss_scale is not None else loss
        grads = tape.gradient(scaled, self.tvars)
        finite = None
        if self.loss_scale is not None:
            inv = 1.0 / self.loss_scale
            grads = [None if g is None else g * inv for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])

        def apply():
            for v, g, buf in zip(self.tvars, grads, self.momentum_bufs):
                if g is None:  # PyTorch's SGD skips parameters without a gradient
                    continue
                lr, mom = tf.cast(self.lr_var, v.dtype), tf.constant(opt.momentum, v.dtype)
                if opt.weight_decay:
                    g = g + opt.weight_decay * tf.convert_to_tensor(v)
                tf.raw_ops.ResourceApplyMomentum(var=v.handle, accum=buf.handle, lr=lr, grad=g, momentum=mom,
                                                 use_locking=False, use_nesterov=False)
            return tf.constant(True)

        if finite is None:
            apply()
        else:  # dynamic loss scaling (as Keras' LossScaleOptimizer): skip and halve on overflow
            def on_ok():
                apply()
                grow = self.good_steps + 1 >= 2000
                self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
                self.good_steps.assign(tf.where(grow, tf.zeros_like(self.good_steps), self.good_steps + 1))
                return tf.constant(True)

            def on_overflow():
                self.loss_scale.assign(tf.maximum(self.loss_scale / 2.0, 1.0))
                self.good_steps.assign(tf.zeros_like(self.good_steps))
                return tf.constant(False)

            tf.cond(finite, on_ok, on_overflow)
        return loss

    # weights -----------------------------------------------------------------

    def set_weights(self, weights) -> None:
        for name, (var, to_native, _) in self.params.items():
            w = np.asarray(weights[name], dtype=np.float32)
            if w.shape != self.ir.params[name].shape:
                raise ValueError(f"{name}: shape {w.shape} != {self.ir.params[name].shape}")
            var.assign(np.ascontiguousarray(to_native(w) if to_native else w))

    def get_weights(self):
        out = {}
        for name, (var, _, from_native) in self.params.items():
            v = np.asarray(var.numpy()).astype(np.float32)
            out[name] = np.ascontiguousarray(from_native(v) if from_native else v).copy()
        return out

    def param_counts(self):
        def count(ws):
            return int(sum(int(np.prod(w.shape)) for w in ws))

        return count(self.train_model.trainable_weights), count(self.train_model.non_trainable_weights)

    def set_masks(self, masks: dict[str, np.ndarray] | None) -> None:
        for name, layer in self.mask_layers.items():
            m = masks.get(name) if masks else None
            if m is None:
                layer.fixed_mask = None
                continue
            m = np.asarray(m, dtype=np.float32)
            if isinstance(layer, _L.Dropout):
                m = self._to_native(m)
            with tf.device(self.device):
                layer.fixed_mask = tf.constant(m)
        self._make_functions()

    # steps -------------------------------------------------------------------

    def forward(self, x, train=False):
        with tf.device(self.device):
            xt = tf.constant(self._to_native(np.asarray(x, dtype=np.float32)))
        out = self._forward_train(xt) if train else self._infer(xt)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [self._from_native(np.asarray(tf.cast(o, tf.float32).numpy())) for o in outs]

    def to_device(self, x, y):
        with tf.device(self.device):
            xt = tf.identity(tf.constant(self._to_native(np.asarray(x, dtype=np.float32))))
            yt = tf.identity(tf.constant(np.asarray(y, dtype=np.int64)))
        return xt, yt

    def infer_step(self, batch):
        self._last = self._infer(batch[0])
        return self._last

    def train_step(self, batch):
        if self.train_unsupported:
            raise UnsupportedError(self.train_unsupported)
        if self.momentum_bufs is None:
            with tf.device(self.device):
                self.momentum_bufs = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.tvars]
                # A variable, not a constant, so that a schedule's set_lr needs no retrace.
                self.lr_var = tf.Variable(self.config.optimizer.lr, trainable=False, dtype=tf.float64)
        self._last = self._train(batch[0], batch[1])
        return self._last

    def set_lr(self, lr: float) -> None:
        self.config = replace(self.config, optimizer=replace(self.config.optimizer, lr=lr))
        if self.momentum_bufs is not None:
            self.lr_var.assign(lr)

    def loss_value(self, loss) -> float:
        return float(loss.numpy())

    def synchronize(self) -> None:
        if self.gpu:
            sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
            if sync is not None:
                sync()
                return
        if self._last is not None:  # materialising the last result waits for it
            last = self._last
            first = last[0] if isinstance(last, (list, tuple)) else last
            first.numpy()

    def memory_stats(self) -> dict[str, float]:
        if not getattr(self, "gpu", False):
            return {}
        info = tf.config.experimental.get_memory_info(self.gpu_name)
        return {"alloc_peak_mb": info["peak"] / MB, "alloc_current_mb": info["current"] / MB}
