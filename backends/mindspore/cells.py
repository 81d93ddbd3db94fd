"""The op Cells and functions the builders return; MindSpore's graph compiler parses them all.

Every call here runs in the schedule of samenet.backends.mindspore.net: a Cell per node that has
parameters, state or constants (BatchNorm, pooling, LRN, dropout, a slope or a factor), a
MindSpore function (or a module-level function of this file) for the parameter-free rest.
BatchNorm and max pooling run other kernels in training: the builders hand the schedule
``forward_train`` (BatchNorm) or the native pool (graph-mode max pooling) for train mode.
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (sets MindSpore's log level and dump path before its import)

import numpy as np
from mindspore import Parameter, Tensor, nn, ops


class BatchNorm(nn.Cell):
    """BatchNorm over axis 1 of (N, C, H, W) or (N, F); the primitive nn.BatchNorm2d uses.

    ``construct`` is eval mode (running statistics), ``forward_train`` train mode (batch
    statistics, running ones updated).
    """

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

    def construct(self, x):
        return self.bn_infer(x, self.weight, self.bias, self.running_mean, self.running_var)[0]

    def forward_train(self, x):
        return self.bn_train(x, self.weight, self.bias, self.running_mean, self.running_var)[0]


class MaxPool(nn.Cell):
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
    (``native_pool``, which the builder hands the train schedule) wherever it applies
    (symmetric pads of at most half the kernel): its forward plus backward is the faster one
    (ResNet-50's stem: 226 against 447 ms; the whole training step 6240 ms with the
    concatenated pads against 5900 ms for the hand-written net).
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

    def construct(self, x):
        if not self.use_pad:
            return self.pool(x)
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


class AvgPool(nn.Cell):
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


class ZeroPad(nn.Cell):
    """zeropad2d with ops.Pad (not ops.pad: see MaxPool)."""

    def __init__(self, pad):
        super().__init__()
        t, b, l, r = pad
        self.pad = ops.Pad(((0, 0), (0, 0), (t, b), (l, r)))

    def construct(self, x):
        return self.pad(x)


class AdaptiveAvgPool(nn.Cell):
    """PyTorch's adaptive average pooling as mh @ x @ mw^T (exact bins)."""

    def __init__(self, mh, mwt):
        super().__init__()
        self.mh, self.mwt = Tensor(mh), Tensor(mwt)

    def construct(self, x):
        return ops.matmul(ops.matmul(self.mh, x), self.mwt)


class LRN(nn.Cell):
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


class Dropout(nn.Cell):
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


class DropPath(Dropout):
    """Stochastic depth: one keep decision per sample."""

    def construct(self, x):
        if not self.active:
            return x
        if self.mask is None:
            # dropout of a ones (N, 1, ...) tensor: keep / (1 - rate) per sample
            return x * ops.dropout(ops.ones((x.shape[0],) + self.tail, x.dtype), p=self.rate, training=True)
        return x * self.mask / self.keep


class LeakyRelu(nn.Cell):
    def __init__(self, slope):
        super().__init__()
        self.slope = slope

    def construct(self, x):
        return ops.leaky_relu(x, self.slope)


class Scale(nn.Cell):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def construct(self, x):
        return x * self.factor


class ChannelShuffle(nn.Cell):
    """ShuffleNet's channel shuffle of ``groups`` groups."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def construct(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return ops.reshape(ops.transpose(ops.reshape(x, (n, g, c // g, h, w)), (0, 2, 1, 3, 4)), (n, c, h, w))


class ChannelSplit(nn.Cell):
    """Channels [start, stop) of (N, C, ...)."""

    def __init__(self, start, stop):
        super().__init__()
        self.start, self.stop = start, stop

    def construct(self, x):
        return x[:, self.start:self.stop]


# Parameter-free ops with fixed arguments: plain functions, as cheap to call as the ops they wrap.


def identity(x):
    return x


def gelu(x):
    """The exact (erf) GELU."""
    return ops.gelu(x, approximate="none")


def softmax(x):
    return ops.softmax(x, 1)


def global_avgpool(x):
    return ops.mean(x, (2, 3), True)


def flatten(x):
    return ops.reshape(x, (x.shape[0], -1))


def concat(*xs):
    return ops.concat(xs, 1)


def add(*xs):
    """The inputs' sum, left to right."""
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    return y


def mul(a, b):
    return a * b
