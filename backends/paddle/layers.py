"""The op layers of the Paddle backend: one paddle.nn.Layer per op kind.

Each forward is a plain call of Paddle functions (no tensor-dependent control flow), so the
static conversion traces them as ordinary Python. The builders (samenet.backends.paddle.builders)
choose the layer and its arguments per node; the conventions are in samenet.backends.paddle.impl.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from samenet.ops import avgpool_divisor


class Unary(nn.Layer):
    """A parameter-free one-input op: ``fn(x, *args)`` (an activation, flatten, scale...)."""

    def __init__(self, fn, *args):
        super().__init__()
        self.fn, self.args = fn, args

    def forward(self, x):
        return self.fn(x, *self.args)


class Identity(nn.Layer):
    def forward(self, x):
        return x


class Add(nn.Layer):
    """Sum of two or more inputs, left to right."""

    def forward(self, *xs):
        out = xs[0] + xs[1]
        for x in xs[2:]:
            out = out + x
        return out


class Mul(nn.Layer):
    def forward(self, x, y):
        return x * y


class Concat(nn.Layer):
    """Concatenation along the channel axis."""

    def forward(self, *xs):
        return paddle.concat(list(xs), axis=1)


class ChannelSplit(nn.Layer):
    """Part ``index`` of ``parts`` equal channel slices."""

    def __init__(self, parts, index):
        super().__init__()
        self.parts, self.index = parts, index

    def forward(self, x):
        step = x.shape[1] // self.parts
        i = self.index
        return x[:, i * step:(i + 1) * step]


class ZeroPad2D(nn.Layer):
    """Zero padding of the spatial axes; ``pad`` is Paddle's [left, right, top, bottom]."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x, self.pad, data_format="NCHW")


class MaxPool(nn.Layer):
    """Native max pooling, cut to the IR's output size where Paddle's ceil mode keeps more."""

    def __init__(self, kernel, stride, padding, ceil, cut):
        super().__init__()
        self.kernel, self.stride, self.padding, self.ceil, self.cut = kernel, stride, padding, ceil, cut

    def forward(self, x):
        y = F.max_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil)
        if self.cut is not None:
            y = y[:, :, : self.cut[0], : self.cut[1]]
        return y


class AvgPool(nn.Layer):
    """Native average pooling (only where Paddle's divisor is the IR's: see the builder)."""

    def __init__(self, kernel, stride, padding, exclusive, cut):
        super().__init__()
        self.kernel, self.stride, self.padding, self.exclusive, self.cut = kernel, stride, padding, exclusive, cut

    def forward(self, x):
        y = F.avg_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=False, exclusive=self.exclusive)
        if self.cut is not None:
            y = y[:, :, : self.cut[0], : self.cut[1]]
        return y


class SumPool(nn.Layer):
    """Average pooling via explicit pads, window sums and the IR's divisor map."""

    def __init__(self, a, in_hw, out_hw, dtype):
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
        div = avgpool_divisor(in_hw, a, out_hw).astype(dtype)
        self.register_buffer("divisor", paddle.to_tensor(div), persistable=False)

    def forward(self, x):
        x = F.pad(x, self.pad, data_format="NCHW")
        s = F.avg_pool2d(x, self.kernel, self.stride, 0, ceil_mode=False, exclusive=False, divisor_override=1)
        if self.cut is not None:
            s = s[:, :, : self.cut[0], : self.cut[1]]
        return s / self.divisor


class BatchNorm(nn.Layer):
    """Paddle's fused batch_norm with only the parameters the IR declares.

    A missing scale or shift is a constant stand-in (a buffer, not a parameter). Paddle
    3.3's batch_norm backward gives the scale and the shift a gradient only when both
    require one (measured: a lone beta or gamma never trains), and its oneDNN kernel
    (static inference) crashes without them: stand-ins beside a real parameter therefore
    require a gradient (``standins``, cleared after each step).
    """

    def __init__(self, c, a, rank):
        super().__init__()
        init = nn.initializer.Constant
        self.weight = self.create_parameter([c], default_initializer=init(1.0)) if a["scale"] else None
        self.bias = self.create_parameter([c], is_bias=True, default_initializer=init(0.0)) if a["center"] else None
        self._mean = self.create_parameter([c], attr=paddle.ParamAttr(initializer=init(0.0), trainable=False))
        self._variance = self.create_parameter([c], attr=paddle.ParamAttr(initializer=init(1.0), trainable=False))
        self._mean.stop_gradient = True
        self._variance.stop_gradient = True
        self.momentum = 1.0 - a["momentum"]  # Paddle's (Keras) sense
        self.eps = a["eps"]
        self.fmt = "NCHW" if rank == 3 else "NC"
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
        """The IR's parameters by local name."""
        p = {"running_mean": self._mean, "running_var": self._variance}
        if self.weight is not None:
            p["weight"] = self.weight
        if self.bias is not None:
            p["bias"] = self.bias
        return p


class Dropout(nn.Layer):
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


class DropPath(Dropout):
    """Stochastic depth, one keep decision per sample (torchvision's "row" mode)."""

    def forward(self, x):
        if not self.training or not self.rate:
            return x
        if self.mask is not None:
            return x * self.mask / (1.0 - self.rate)
        # dropout of a ones tensor of shape (N, 1, ...): keep / (1 - rate) per sample
        one = x[:, :1, :1, :1] if len(x.shape) == 4 else x[:, :1]
        return x * F.dropout(paddle.ones_like(one), self.rate, training=True)
