"""The Keras layer classes of the shared model, written in ``keras.ops``.

Every Keras backend runs these (with Keras' own Conv2D, DepthwiseConv2D, Dense...); a backend
may replace some with faster or exact ones for its framework: :class:`LayerSet` names the
classes the builder takes, and the tf backend passes a copy with TensorFlow kernels
(backends/tf/layers.py). KERAS_BACKEND must be set before this module is imported (the
importing backend's ``impl`` does it).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops


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


class Gelu(keras.layers.Layer):
    """The exact GELU, x / 2 * (1 + erf(x / sqrt(2))): ``approximate=False`` (keras.ops.gelu's
    default is the tanh approximation)."""

    def call(self, x):
        return ops.gelu(x, approximate=False)


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


@dataclass(frozen=True)
class LayerSet:
    """The layer classes the builder instantiates; a backend replaces some with
    ``dataclasses.replace(GENERIC, BatchNorm=..., ...)``."""

    Conv2D: type
    DepthwiseConv2D: type
    BatchNorm: type
    Dropout: type
    DropPath: type
    Gelu: type
    Pad: type
    Pool: type
    Rescale: type
    AdaptiveAvgPool: type
    LRN: type
    ChannelShuffle: type
    ChannelSlice: type


GENERIC = LayerSet(Conv2D=keras.layers.Conv2D, DepthwiseConv2D=keras.layers.DepthwiseConv2D, BatchNorm=BatchNorm,
                   Dropout=Dropout, DropPath=DropPath, Gelu=Gelu, Pad=Pad, Pool=Pool, Rescale=Rescale,
                   AdaptiveAvgPool=AdaptiveAvgPool, LRN=LRN, ChannelShuffle=ChannelShuffle,
                   ChannelSlice=ChannelSlice)
"""The generic classes: what keras-torch and keras-jax run."""
