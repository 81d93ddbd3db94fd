"""The op vocabulary: one table, one entry per op.

Each entry (:class:`OpSchema`) declares the op's attributes (type, default, meaning), its
shape rule, its parameters (canonical layout, trainable or not, default initializer), its
multiply-accumulate count, its numpy forward and backward, its traits (what the rest of the
harness needs to know of it: ``TRAITS``) and the conformance cases every backend is tested on.
Adding an op means adding one entry here and one builder to each backend's ``BUILDERS``
table; the harness reads traits, never op names (docs/extending.md).

Conventions (canonical, as in the IR):
    * Shapes are per sample, without the batch axis: ``(C, H, W)`` or ``(F,)``.
    * Conv weights are OIHW with ``I = in_channels / groups``; linear weights are (out, in).
    * Pads are explicit per side, ``(top, bottom, left, right)``. In a spec ``pad`` may be
      an int (all sides), ``[ph, pw]``, ``[top, bottom, left, right]``, ``"valid"`` (0) or
      ``"same"``: TensorFlow's rule, resolved once to explicit pads,
      ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, the odd pixel at the
      bottom/right.
    * Pooling output size follows PyTorch, ceil mode included: with ceil mode a window that
      would start in the right padding is dropped. Max pooling pads with -inf. Average
      pooling divides by the number of window elements inside the input plus its pads
      (``count_include_pad=True``) or inside the input only (``False``); the part of a
      ceil-mode window beyond the pads never counts.
    * BatchNorm momentum is PyTorch's: ``running = (1 - m) * running + m * batch_stat``;
      the running variance takes the unbiased batch variance, the normalisation the
      biased one.
    * MACs follow torchvision's convention: multiply-accumulates of conv2d and linear only,
      per sample, eval mode. Nothing else (BN, activations, pooling, add, mul, softmax) is
      counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import SpecError

Shape = tuple[int, ...]
REQUIRED = object()


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attr:
    """One attribute of an op.

    Attributes:
        name: Attribute name as written in a spec.
        kind: Value type: ``int``, ``float``, ``bool``, ``pair`` (int or [int, int]),
            ``pads`` (see module docs), ``choice``, ``init`` (initializer per parameter),
            ``rate`` (float in [0, 1) or null).
        default: Default value, or ``REQUIRED``.
        doc: What the attribute means.
        minimum: Smallest allowed value for ints, floats and pairs.
        choices: Allowed values for ``choice``.
        maximum: Largest allowed value for floats.
    """

    name: str
    kind: str
    default: Any
    doc: str
    minimum: int | float | None = None
    choices: tuple = ()
    maximum: float | None = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def parse_attr(attr: Attr, value: Any) -> Any:
    """Checks and normalises one attribute value; raises SpecError(reason) if invalid."""
    k = attr.kind
    if k == "int":
        if not _is_int(value):
            raise SpecError(f"expected an integer, got {_type_name(value)} {value!r}")
        if attr.minimum is not None and value < attr.minimum:
            raise SpecError(f"must be >= {attr.minimum}, got {value}")
        return value
    if k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"expected a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise SpecError(f"expected a finite number, got {value!r}")
        if attr.minimum is not None and value < attr.minimum:
            raise SpecError(f"must be >= {attr.minimum}, got {value}")
        if attr.maximum is not None and value > attr.maximum:
            raise SpecError(f"must be <= {attr.maximum}, got {value}")
        return float(value)
    if k == "rate":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"expected a number in [0, 1), got {_type_name(value)} {value!r}")
        if not 0.0 <= value < 1.0:
            raise SpecError(f"must be in [0, 1), got {value}")
        return float(value)
    if k == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"expected true or false, got {_type_name(value)} {value!r}")
        return value
    if k == "choice":
        if value not in attr.choices:
            raise SpecError(f"expected one of {list(attr.choices)}, got {value!r}")
        return value
    if k == "pair":
        pair = [value, value] if _is_int(value) else value
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)):
            raise SpecError(f"expected an integer or a pair of integers, got {_type_name(value)} {value!r}")
        lo = attr.minimum if attr.minimum is not None else 1
        if min(pair) < lo:
            raise SpecError(f"sizes must be >= {lo}, got {value!r}")
        return tuple(pair)
    if k == "pads":
        if value in ("same", "valid"):
            return value if value == "same" else (0, 0, 0, 0)
        if _is_int(value):
            value = [value] * 4
        elif isinstance(value, list) and len(value) == 2:
            value = [value[0], value[0], value[1], value[1]]
        if not (isinstance(value, list) and len(value) == 4 and all(_is_int(x) for x in value)):
            raise SpecError("expected an integer, [ph, pw], [top, bottom, left, right], "
                            f"\"same\" or \"valid\", got {_type_name(value)} {value!r}")
        if min(value) < 0:
            raise SpecError(f"pads must be >= 0, got {value!r}")
        return tuple(value)
    if k == "init":
        if not isinstance(value, dict):
            raise SpecError(f"expected an object of initializers per parameter, got {_type_name(value)}")
        return dict(value)
    raise AssertionError(f"unknown attribute kind {k}")


# --------------------------------------------------------------------------- schema types


@dataclass(frozen=True)
class ParamDecl:
    """A parameter an op node owns, in canonical layout.

    Attributes:
        name: Local name (``weight``, ``bias``, ``running_mean`` ...).
        shape: Canonical shape.
        trainable: False for running statistics.
        init: Default initializer (overridable per node with the ``init`` attribute).
        fan_in: Fan-in used by fan-based initializers (a bias takes its weight's).
        fan_out: Fan-out used by fan-based initializers.
    """

    name: str
    shape: Shape
    trainable: bool
    init: dict
    fan_in: int = 1
    fan_out: int = 1


@dataclass
class RefContext:
    """State the numpy reference needs beyond inputs and parameters.

    Attributes:
        train: Train semantics (BN batch statistics, dropout on) instead of eval.
        node: Name of the node being run (keys of ``masks`` and ``updates``).
        masks: Keep-masks for dropout and drop_path per node name; drawn from ``rng``
            and recorded here when absent, so a caller can hand them to a backend.
        rng: Random generator for masks not supplied.
        updates: New values of non-trainable parameters (BN running statistics) by
            full parameter name, filled in train mode.
        bn_unbiased: Update the running variance with the unbiased batch variance (the
            IR's convention); False gives Keras' biased update, to judge such backends.
        flips: Max-pool windows ``(node, n, c, i, j)`` whose gradient goes to the runner-up
            instead of the maximum (near-ties that fp32 rounding may resolve either way).
    """

    train: bool = False
    node: str = ""
    masks: dict = field(default_factory=dict)
    rng: np.random.Generator | None = None
    updates: dict = field(default_factory=dict)
    bn_unbiased: bool = True
    flips: frozenset = frozenset()

    def mask(self, shape: Shape, rate: float) -> np.ndarray:
        if self.node not in self.masks:
            rng = self.rng if self.rng is not None else np.random.default_rng(0)
            self.masks[self.node] = rng.random(shape) >= rate
        m = np.asarray(self.masks[self.node], dtype=bool)
        if m.shape != tuple(shape):
            raise ValueError(f"{self.node}: mask shape {m.shape} != {tuple(shape)}")
        return m


TRAITS = {
    "weighted": "a learned linear map (conv, linear): probe weights rescale it to unit output (LSUV), "
                "and the layers that produce the outputs are found through it",
    "normaliser": "batch normalisation: probe weights set its running statistics near the calibration batch's",
    "stochastic": "draws random keep-masks in training; parity fixes them through set_masks",
    "train_only": "the identity in eval mode",
    "passthrough": "one input, same shape, no parameters, a rescaling at most: looked through when "
                   "finding the normaliser that ends a residual branch",
    "residual_sum": "sums residual branches: probe weights damp the normalisers that end them",
    "argmax": "routes the gradient to a window's maximum: near-ties are found and resolved both ways",
    "scheduled_rate": "a null rate takes the spec's drop_path schedule",
    "internal": "the graph's entry: never written in a spec",
}
"""Every trait an op may carry, and what the harness does with it."""


@dataclass(frozen=True)
class OpSchema:
    """One op of the vocabulary.

    Attributes:
        name: Op name used in specs.
        doc: One-paragraph meaning, including the exact formula where frameworks differ.
        attrs: Declared attributes.
        arity: Number of inputs, or -1 for two or more.
        infer: Shape rule ``(input_shapes, attrs) -> (output_shape, resolved_attrs)``;
            resolves attributes that depend on the input (``"same"`` pads).
        params: ``(input_shapes, attrs) -> [ParamDecl]``.
        macs: ``(input_shapes, output_shape, attrs) -> int`` per sample.
        reference: numpy ``(inputs, params, attrs, ctx) -> output``, batch axis first.
        backward: numpy ``(inputs, params, attrs, output, d_output, ctx) -> (d_inputs,
            d_params)``, the training oracle's (samenet.grads); None only for ``input``.
        cases: Conformance cases: dicts with ``id``, ``inputs`` (shapes) and ``attrs``, and
            optionally ``scale`` and ``shift`` of the N(0, 1) input.
        traits: What the harness needs to know of the op beyond its formulas (TRAITS).
    """

    name: str
    doc: str
    attrs: tuple[Attr, ...]
    arity: int
    infer: Callable[[list[Shape], dict], tuple[Shape, dict]]
    reference: Callable[..., np.ndarray]
    params: Callable[[list[Shape], dict], list[ParamDecl]] = lambda shapes, a: []
    macs: Callable[[list[Shape], Shape, dict], int] = lambda shapes, out, a: 0
    backward: Callable[..., tuple[list, dict]] | None = None
    cases: tuple[dict, ...] = ()
    traits: frozenset[str] = frozenset()

    def has(self, trait: str) -> bool:
        return trait in self.traits

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)


# --------------------------------------------------------------------------- helpers


def _rank(shapes: list[Shape], rank: int, what: str) -> None:
    for s in shapes:
        if len(s) != rank:
            want = "(C, H, W)" if rank == 3 else "(F,)"
            raise SpecError(f"{what} expects inputs of shape {want}, got {fmt_shape(s)}")


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def same_pads(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" pads (before, after) for one axis."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def resolve_pads(pad: Any, hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int, int, int]:
    if pad == "same":
        t, b = same_pads(hw[0], kernel[0], stride[0], dilation[0])
        l, r = same_pads(hw[1], kernel[1], stride[1], dilation[1])
        return (t, b, l, r)
    return tuple(pad)


def conv_out(n: int, k: int, s: int, p0: int, p1: int, d: int = 1) -> int:
    span = n + p0 + p1 - (k - 1) * d - 1
    if span < 0:
        raise SpecError(f"kernel {(k - 1) * d + 1} larger than padded input {n + p0 + p1}")
    return span // s + 1


def pool_out(n: int, k: int, s: int, p0: int, p1: int, ceil: bool) -> int:
    span = n + p0 + p1 - k
    if span < 0:
        raise SpecError(f"kernel {k} larger than padded input {n + p0 + p1}")
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + p0:  # PyTorch: the last window must start inside input or left pad
        out -= 1
    return out


def _windows(x: np.ndarray, kernel, stride, dilation, out_hw) -> np.ndarray:
    """(N, C, Ho, Wo, kh, kw) strided view of an already padded NCHW array."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    v = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return v[:, :, ::sh, ::sw, ::dh, ::dw][:, :, : out_hw[0], : out_hw[1]]


def _pool_pad(x: np.ndarray, attrs: dict, out_hw, value: float) -> np.ndarray:
    """Pads NCHW by the pads plus any ceil-mode overhang on the bottom/right."""
    t, b, l, r = attrs["pad"]
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["stride"]
    H, W = x.shape[2:]
    extra_h = max((out_hw[0] - 1) * sh + kh - (H + t + b), 0)
    extra_w = max((out_hw[1] - 1) * sw + kw - (W + l + r), 0)
    return np.pad(x, ((0, 0), (0, 0), (t, b + extra_h), (l, r + extra_w)), constant_values=value)


def avgpool_divisor(in_hw, attrs: dict, out_hw) -> np.ndarray:
    """Divisor per output position (Ho, Wo) of average pooling, per the module rule."""
    t, b, l, r = attrs["pad"]
    H, W = in_hw
    mask = np.zeros((1, 1, H + t + b, W + l + r))
    if attrs["count_include_pad"]:
        mask[:] = 1.0
    else:
        mask[:, :, t : t + H, l : l + W] = 1.0
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["stride"]
    extra_h = max((out_hw[0] - 1) * sh + kh - (H + t + b), 0)
    extra_w = max((out_hw[1] - 1) * sw + kw - (W + l + r), 0)
    mask = np.pad(mask, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    return _windows(mask, attrs["kernel"], attrs["stride"], (1, 1), out_hw).sum(axis=(-2, -1))[0, 0]


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of PyTorch's adaptive average pooling bins."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _same(shapes, attrs):
    return shapes[0], attrs


def _elementwise(name: str, doc: str, fn, derivative, attrs: tuple[Attr, ...] = (), cases=None,
                 traits: frozenset[str] = frozenset()) -> OpSchema:
    """A one-input op ``y = fn(x, attrs)`` whose gradient is ``dy * derivative(x, y, attrs)``."""
    return OpSchema(
        name=name, doc=doc, attrs=attrs, arity=1, infer=_same,
        reference=lambda xs, p, a, ctx: fn(xs[0], a),
        backward=_pointwise_backward(derivative),
        cases=cases or ({"inputs": [(4, 5, 5)], "attrs": {}}, {"inputs": [(7,)], "attrs": {}}),
        traits=traits,
    )


# --------------------------------------------------------------------------- backward kernels
#
# ``backward(xs, p, a, y, dy, ctx) -> (dxs, dparams)``: ``xs`` the op's inputs, ``p`` its parameters
# by local name, ``a`` its attributes, ``y`` its output, ``dy`` the gradient of the loss with respect
# to ``y``; returns one gradient per input and per parameter (checked against finite differences
# in the core tests).


def conv2d_backward(x, w, dy, stride, pads, dilation, groups):
    """Gradients (dx, dw) of conv2d_reference, by kernel taps as batched matmuls."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    t, b, l, r = pads
    (sh, sw), (dh, dw_) = stride, dilation
    Ho, Wo = dy.shape[2:]
    G, Og = groups, O // groups
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    dy_g = dy.reshape(N, G, Og, Ho * Wo).transpose(1, 2, 0, 3).reshape(G, Og, N * Ho * Wo)
    w_g = w.reshape(G, Og, Cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            hs, ws = slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh), slice(j * dw_, j * dw_ + sw * (Wo - 1) + 1, sw)
            xs = xp[:, :, hs, ws].reshape(N, G, Cg, Ho * Wo).transpose(1, 0, 3, 2).reshape(G, N * Ho * Wo, Cg)
            dw[:, :, i, j] = (dy_g @ xs).reshape(O, Cg)
            dxs = w_g[:, :, :, i, j].transpose(0, 2, 1) @ dy_g  # G, Cg, N*Ho*Wo
            dxp[:, :, hs, ws] += dxs.reshape(G, Cg, N, Ho, Wo).transpose(2, 0, 1, 3, 4).reshape(N, C, Ho, Wo)
    return dxp[:, :, t : t + H, l : l + W], dw


def _unbroadcast(g, shape):
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g




def _conv_backward(xs, p, a, y, dy, ctx):
    dx, dw = conv2d_backward(xs[0], p["weight"], dy, a["stride"], a["pad"], a["dilation"], a["groups"])
    dp = {"weight": dw}
    if "bias" in p:
        dp["bias"] = dy.sum(axis=(0, 2, 3))
    return [dx], dp


def _linear_backward(xs, p, a, y, dy, ctx):
    dp = {"weight": dy.T @ xs[0]}
    if "bias" in p:
        dp["bias"] = dy.sum(axis=0)
    return [dy @ p["weight"]], dp


def _bn_backward(xs, p, a, y, dy, ctx):
    x = xs[0]
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    gamma = p["weight"].reshape(shape) if "weight" in p else 1.0
    if ctx.train:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = p["running_mean"], p["running_var"]
    inv = 1.0 / np.sqrt(var.reshape(shape) + a["eps"])
    xhat = (x - mean.reshape(shape)) * inv
    dp = {}
    if "weight" in p:
        dp["weight"] = (dy * xhat).sum(axis=axes)
    if "bias" in p:
        dp["bias"] = dy.sum(axis=axes)
    dxhat = dy * gamma
    if ctx.train:
        m = x.size / x.shape[1]
        dx = inv / m * (m * dxhat - dxhat.sum(axis=axes, keepdims=True)
                        - xhat * (dxhat * xhat).sum(axis=axes, keepdims=True))
    else:
        dx = dxhat * inv
    return [dx], dp


def _pointwise_backward(derivative: Callable):
    return lambda xs, p, a, y, dy, ctx: ([dy * derivative(xs[0], y, a)], {})


def _softmax_backward(xs, p, a, y, dy, ctx):
    return [y * (dy - (dy * y).sum(axis=1, keepdims=True))], {}


def _maxpool_backward(xs, p, a, y, dy, ctx):
    x = xs[0]
    N, C, H, W = x.shape
    out_hw = dy.shape[2:]
    xp = _pool_pad(x, a, out_hw, -np.inf)
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    flat = _windows(xp, (kh, kw), (sh, sw), (1, 1), out_hw).reshape(N, C, *out_hw, kh * kw)
    idx = flat.argmax(axis=-1)
    for node, n_, c_, i_, j_ in ctx.flips:  # near-ties resolved the other way (see samenet.conformance)
        if node == ctx.node:
            idx[n_, c_, i_, j_] = int(np.argsort(flat[n_, c_, i_, j_], kind="stable")[-2])
    rows = np.arange(out_hw[0])[:, None] * sh + idx // kw
    cols = np.arange(out_hw[1])[None, :] * sw + idx % kw
    n = np.arange(N)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    dxp = np.zeros_like(xp)
    np.add.at(dxp, (n, c, rows, cols), dy)
    t, _, l, _ = a["pad"]
    return [dxp[:, :, t : t + H, l : l + W]], {}


def _avgpool_backward(xs, p, a, y, dy, ctx):
    x = xs[0]
    H, W = x.shape[2:]
    out_hw = dy.shape[2:]
    g = dy / avgpool_divisor((H, W), a, out_hw)
    dxp = np.zeros_like(_pool_pad(x, a, out_hw, 0.0))
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + sh * (out_hw[0] - 1) + 1 : sh, j : j + sw * (out_hw[1] - 1) + 1 : sw] += g
    t, _, l, _ = a["pad"]
    return [dxp[:, :, t : t + H, l : l + W]], {}


def _adaptive_backward(xs, p, a, y, dy, ctx):
    H, W = xs[0].shape[2:]
    mh = adaptive_pool_matrix(H, a["output_size"][0])
    mw = adaptive_pool_matrix(W, a["output_size"][1])
    return [np.einsum("ncij,ih,jw->nchw", dy, mh, mw)], {}


def _global_avgpool_backward(xs, p, a, y, dy, ctx):
    H, W = xs[0].shape[2:]
    return [np.broadcast_to(dy / (H * W), xs[0].shape).copy()], {}


def _mask_backward(xs, p, a, y, dy, ctx):
    if not ctx.train or not a["rate"]:
        return [dy], {}
    mask = np.asarray(ctx.masks[ctx.node], dtype=bool)
    if mask.ndim == 1:  # drop_path: one decision per sample
        mask = mask.reshape((-1,) + (1,) * (dy.ndim - 1))
    return [dy * mask / (1.0 - a["rate"])], {}


def _lrn_backward(xs, p, a, y, dy, ctx):
    x = xs[0]
    n, alpha, beta, k = a["size"], a["alpha"], a["beta"], a["k"]
    before, after = n // 2, (n - 1) // 2
    sq = np.pad(x * x, ((0, 0), (before, after), (0, 0), (0, 0)))
    d = k + alpha * np.lib.stride_tricks.sliding_window_view(sq, n, axis=1).sum(axis=-1)
    # channel j is in the window of channel c for c in [j - after, j + before]
    t = np.pad(dy * x * d ** (-beta - 1), ((0, 0), (after, before), (0, 0), (0, 0)))
    s = np.lib.stride_tricks.sliding_window_view(t, n, axis=1).sum(axis=-1)
    return [dy * d ** (-beta) - 2 * alpha * beta * x * s], {}


def _concat_backward(xs, p, a, y, dy, ctx):
    bounds = np.cumsum([x.shape[1] for x in xs])[:-1]
    return list(np.split(dy, bounds, axis=1)), {}


def _mul_backward(xs, p, a, y, dy, ctx):
    return [_unbroadcast(dy * xs[1], xs[0].shape), _unbroadcast(dy * xs[0], xs[1].shape)], {}


def _shuffle_backward(xs, p, a, y, dy, ctx):
    N, C, H, W = dy.shape
    g = a["groups"]
    return [dy.reshape(N, C // g, g, H, W).transpose(0, 2, 1, 3, 4).reshape(N, C, H, W)], {}


def _split_backward(xs, p, a, y, dy, ctx):
    dx = np.zeros_like(xs[0])
    step = xs[0].shape[1] // a["parts"]
    dx[:, a["index"] * step : (a["index"] + 1) * step] = dy
    return [dx], {}


def _zeropad_backward(xs, p, a, y, dy, ctx):
    t, b, l, r = a["pad"]
    H, W = xs[0].shape[2:]
    return [dy[:, :, t : t + H, l : l + W]], {}


def _hardswish_derivative(x, y, a):
    return np.where(x <= -3, 0.0, np.where(x >= 3, 1.0, (2 * x + 3) / 6))



# --------------------------------------------------------------------------- conv2d

INIT_ATTR = Attr("init", "init", {}, "Initializer per parameter name, overriding the op's default "
                 "(see samenet.init for the kinds)")

TORCH_WEIGHT_INIT = {"kind": "kaiming_uniform", "a": math.sqrt(5)}
TORCH_BIAS_INIT = {"kind": "uniform_fan_in"}


def _conv_infer(shapes, a):
    _rank(shapes, 3, "conv2d")
    C, H, W = shapes[0]
    g = a["groups"]
    if C % g or a["out_channels"] % g:
        raise SpecError(f"in_channels {C} and out_channels {a['out_channels']} must be divisible by groups {g}")
    pads = resolve_pads(a["pad"], (H, W), a["kernel"], a["stride"], a["dilation"])
    ho = conv_out(H, a["kernel"][0], a["stride"][0], pads[0], pads[1], a["dilation"][0])
    wo = conv_out(W, a["kernel"][1], a["stride"][1], pads[2], pads[3], a["dilation"][1])
    return (a["out_channels"], ho, wo), {**a, "pad": pads}


def _conv_params(shapes, a):
    C = shapes[0][0]
    O, g, (kh, kw) = a["out_channels"], a["groups"], a["kernel"]
    fan_in, fan_out = C // g * kh * kw, O * kh * kw
    ps = [ParamDecl("weight", (O, C // g, kh, kw), True, TORCH_WEIGHT_INIT, fan_in, fan_out)]
    if a["bias"]:
        ps.append(ParamDecl("bias", (O,), True, TORCH_BIAS_INIT, fan_in, fan_out))
    return ps


def _conv_macs(shapes, out, a):
    C = shapes[0][0]
    return out[0] * (C // a["groups"]) * a["kernel"][0] * a["kernel"][1] * out[1] * out[2]


def conv2d_reference(x, w, b, stride, pads, dilation, groups):
    """NCHW convolution (cross-correlation) with explicit pads, groups and dilation."""
    N = x.shape[0]
    O, Cg, kh, kw = w.shape
    t, bo, l, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    ho = conv_out(x.shape[2], kh, stride[0], t, bo, dilation[0])
    wo = conv_out(x.shape[3], kw, stride[1], l, r, dilation[1])
    win = _windows(xp, (kh, kw), stride, dilation, (ho, wo))  # N, C, Ho, Wo, kh, kw
    G, Og = groups, O // groups
    if G == 1:
        out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # N, Ho, Wo, O
        out = out.transpose(0, 3, 1, 2)
    elif Cg == 1:  # depthwise-like: accumulate over kernel taps, cheap and exact
        win = win.reshape(N, G, 1, ho, wo, kh, kw)
        wg = w.reshape(G, Og, kh, kw)
        out = np.zeros((N, G, Og, ho, wo), dtype=np.result_type(x, w))
        for i in range(kh):
            for j in range(kw):
                out += win[:, :, :, :, :, i, j] * wg[None, :, :, i, j, None, None]
        out = out.reshape(N, O, ho, wo)
    else:
        parts = []
        for gi in range(G):
            wgi = w[gi * Og : (gi + 1) * Og]
            xgi = win[:, gi * Cg : (gi + 1) * Cg]
            parts.append(np.tensordot(xgi, wgi, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2))
        out = np.concatenate(parts, axis=1)
    if b is not None:
        out = out + b[None, :, None, None]
    return np.ascontiguousarray(out)


CONV2D = OpSchema(
    name="conv2d",
    doc="2-D cross-correlation, NCHW, weight OIHW with I = in_channels / groups; "
    "groups = in_channels gives a depthwise conv (channel multiplier out_channels / in_channels).",
    attrs=(
        Attr("out_channels", "int", REQUIRED, "Number of output channels", minimum=1),
        Attr("kernel", "pair", REQUIRED, "Kernel size (kh, kw)"),
        Attr("stride", "pair", 1, "Stride (sh, sw)"),
        Attr("pad", "pads", 0, "Per-side zero padding (see module docs)"),
        Attr("dilation", "pair", 1, "Dilation (dh, dw)"),
        Attr("groups", "int", 1, "Groups; in and out channels must be divisible by it", minimum=1),
        Attr("bias", "bool", True, "Learn a bias per output channel"),
        INIT_ATTR,
    ),
    arity=1,
    infer=_conv_infer,
    params=_conv_params,
    macs=_conv_macs,
    reference=lambda xs, p, a, ctx: conv2d_reference(
        xs[0], p["weight"], p.get("bias"), a["stride"], a["pad"], a["dilation"], a["groups"]),
    backward=_conv_backward,
    traits=frozenset({"weighted"}),
    cases=(
        {"id": "3x3_pad1", "inputs": [(3, 8, 8)], "attrs": {"out_channels": 4, "kernel": 3, "pad": 1}},
        {"id": "stride2_asym_pads", "inputs": [(3, 9, 8)],
         "attrs": {"out_channels": 5, "kernel": 3, "stride": 2, "pad": [0, 1, 1, 0]}},
        {"id": "same_stride2", "inputs": [(2, 8, 7)],
         "attrs": {"out_channels": 3, "kernel": 3, "stride": 2, "pad": "same"}},
        {"id": "rect_kernel", "inputs": [(4, 7, 7)], "attrs": {"out_channels": 4, "kernel": [1, 7], "pad": [0, 3]}},
        {"id": "groups2", "inputs": [(4, 6, 6)], "attrs": {"out_channels": 6, "kernel": 3, "groups": 2, "pad": 1}},
        {"id": "depthwise", "inputs": [(4, 6, 6)], "attrs": {"out_channels": 4, "kernel": 3, "groups": 4, "pad": 1}},
        {"id": "depthwise_mult2_stride2", "inputs": [(3, 7, 7)],
         "attrs": {"out_channels": 6, "kernel": 3, "groups": 3, "stride": 2, "pad": [1, 1, 1, 1]}},
        {"id": "dilation2", "inputs": [(3, 9, 9)], "attrs": {"out_channels": 2, "kernel": 3, "dilation": 2, "pad": 2}},
        {"id": "no_bias_1x1", "inputs": [(5, 4, 4)], "attrs": {"out_channels": 3, "kernel": 1, "bias": False}},
        {"id": "large_k_stride4", "inputs": [(3, 23, 23)], "attrs": {"out_channels": 4, "kernel": 11, "stride": 4, "pad": 2}},
    ),
)

# --------------------------------------------------------------------------- linear


def _linear_infer(shapes, a):
    _rank(shapes, 1, "linear")
    return (a["out_features"],), a


LINEAR = OpSchema(
    name="linear",
    doc="Fully connected layer y = x W^T + b, weight (out_features, in_features).",
    attrs=(
        Attr("out_features", "int", REQUIRED, "Number of outputs", minimum=1),
        Attr("bias", "bool", True, "Learn a bias"),
        INIT_ATTR,
    ),
    arity=1,
    infer=_linear_infer,
    params=lambda s, a: [
        ParamDecl("weight", (a["out_features"], s[0][0]), True, TORCH_WEIGHT_INIT, s[0][0], a["out_features"]),
        *([ParamDecl("bias", (a["out_features"],), True, TORCH_BIAS_INIT, s[0][0], a["out_features"])]
          if a["bias"] else []),
    ],
    macs=lambda s, out, a: s[0][0] * a["out_features"],
    reference=lambda xs, p, a, ctx: xs[0] @ p["weight"].T + (p["bias"] if "bias" in p else 0.0),
    backward=_linear_backward,
    traits=frozenset({"weighted"}),
    cases=(
        {"id": "basic", "inputs": [(12,)], "attrs": {"out_features": 5}},
        {"id": "no_bias", "inputs": [(7,)], "attrs": {"out_features": 3, "bias": False}},
    ),
)

# --------------------------------------------------------------------------- batchnorm


def _bn_infer(shapes, a):
    if len(shapes[0]) not in (1, 3):
        raise SpecError(f"batchnorm expects (C, H, W) or (F,), got {fmt_shape(shapes[0])}")
    return shapes[0], a


def _bn_params(shapes, a):
    C = shapes[0][0]
    ps = []
    if a["scale"]:
        ps.append(ParamDecl("weight", (C,), True, {"kind": "ones"}))
    if a["center"]:
        ps.append(ParamDecl("bias", (C,), True, {"kind": "zeros"}))
    ps.append(ParamDecl("running_mean", (C,), False, {"kind": "zeros"}))
    ps.append(ParamDecl("running_var", (C,), False, {"kind": "ones"}))
    return ps


def _bn_reference(xs, p, a, ctx: RefContext):
    x = xs[0]
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    bshape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    if ctx.train:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        n = x.size // x.shape[1]
        m = a["momentum"]
        ctx.updates[ctx.node + ".running_mean"] = (1 - m) * p["running_mean"] + m * mean
        unbiased = var * n / max(n - 1, 1) if ctx.bn_unbiased else var
        ctx.updates[ctx.node + ".running_var"] = (1 - m) * p["running_var"] + m * unbiased
    else:
        mean, var = p["running_mean"], p["running_var"]
    y = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + a["eps"])
    if "weight" in p:
        y = y * p["weight"].reshape(bshape)
    if "bias" in p:
        y = y + p["bias"].reshape(bshape)
    return y


BATCHNORM = OpSchema(
    name="batchnorm",
    doc="Batch normalisation over the channel axis: y = (x - mean) / sqrt(var + eps) * weight "
    "+ bias. Eval uses the running statistics; train uses the batch's (biased variance) and "
    "updates running = (1 - momentum) * running + momentum * batch (unbiased variance), "
    "PyTorch's convention. Running statistics are non-trainable parameters.",
    attrs=(
        Attr("eps", "float", 1e-5, "Added to the variance", minimum=1e-12),
        Attr("momentum", "float", 0.1, "PyTorch-sense momentum (Keras momentum = 1 - this)", minimum=0.0,
             maximum=1.0),
        Attr("scale", "bool", True, "Learn gamma (Keras scale); affine off = scale and center false"),
        Attr("center", "bool", True, "Learn beta (Keras center)"),
        INIT_ATTR,
    ),
    arity=1,
    infer=_bn_infer,
    params=_bn_params,
    reference=_bn_reference,
    backward=_bn_backward,
    traits=frozenset({"normaliser"}),
    cases=(
        {"id": "2d", "inputs": [(4, 5, 5)], "attrs": {}},
        {"id": "eps_1e-3", "inputs": [(3, 4, 4)], "attrs": {"eps": 1e-3}},
        {"id": "no_scale", "inputs": [(3, 4, 4)], "attrs": {"scale": False}},
        {"id": "no_affine", "inputs": [(3, 4, 4)], "attrs": {"scale": False, "center": False}},
        {"id": "1d", "inputs": [(6,)], "attrs": {}},
    ),
)

# --------------------------------------------------------------------------- activations

RELU = _elementwise("relu", "max(x, 0)", lambda x, a: np.maximum(x, 0),
                    lambda x, y, a: (x > 0).astype(x.dtype))
RELU6 = _elementwise("relu6", "min(max(x, 0), 6)", lambda x, a: np.clip(x, 0, 6),
                     lambda x, y, a: ((x > 0) & (x < 6)).astype(x.dtype),
                     cases=({"inputs": [(3, 4, 4)], "attrs": {}, "scale": 8.0},))
LEAKY_RELU = _elementwise(
    "leaky_relu", "x if x >= 0 else negative_slope * x",
    lambda x, a: np.where(x >= 0, x, a["negative_slope"] * x),
    lambda x, y, a: np.where(x > 0, 1.0, a["negative_slope"]),
    attrs=(Attr("negative_slope", "float", 0.01, "Slope for x < 0"),),
    cases=({"inputs": [(3, 4, 4)], "attrs": {}}, {"id": "slope0.2", "inputs": [(5,)], "attrs": {"negative_slope": 0.2}}),
)
SIGMOID = _elementwise("sigmoid", "1 / (1 + exp(-x))", lambda x, a: _sigmoid(x), lambda x, y, a: y * (1 - y))
TANH = _elementwise("tanh", "tanh(x)", lambda x, a: np.tanh(x), lambda x, y, a: 1 - y * y)
HARDSIGMOID = _elementwise("hardsigmoid", "relu6(x + 3) / 6 (PyTorch and Keras 3; not TF1's 0.2x + 0.5)",
                           lambda x, a: np.clip(x + 3, 0, 6) / 6, lambda x, y, a: ((x > -3) & (x < 3)) / 6.0,
                           cases=({"inputs": [(3, 4, 4)], "attrs": {}, "scale": 6.0},))
HARDSWISH = _elementwise("hardswish", "x * relu6(x + 3) / 6", lambda x, a: x * np.clip(x + 3, 0, 6) / 6,
                         _hardswish_derivative, cases=({"inputs": [(3, 4, 4)], "attrs": {}, "scale": 6.0},))
SILU = _elementwise("silu", "x * sigmoid(x) (swish)", lambda x, a: x * _sigmoid(x),
                    lambda x, y, a: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))))
IDENTITY = _elementwise("identity", "y = x", lambda x, a: x, lambda x, y, a: 1.0, traits=frozenset({"passthrough"}))


def _erf(x):
    """Elementwise erf to float64 accuracy (math.erf; numpy has none)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.result_type(x, np.float32))


GELU = _elementwise(
    "gelu", "x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))), the exact form (not the tanh approximation)",
    lambda x, a: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    lambda x, y, a: 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi),
    cases=({"inputs": [(4, 5, 5)], "attrs": {}, "scale": 3.0}, {"inputs": [(7,)], "attrs": {}}),
)


def _softmax_ref(x, a):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


SOFTMAX = OpSchema(
    name="softmax", doc="Softmax over the channel/feature axis", attrs=(), arity=1, infer=_same,
    reference=lambda xs, p, a, ctx: _softmax_ref(xs[0], a), backward=_softmax_backward,
    cases=({"inputs": [(4, 5, 5)], "attrs": {}}, {"inputs": [(7,)], "attrs": {}}),
)

# --------------------------------------------------------------------------- pooling

_POOL_ATTRS = (
    Attr("kernel", "pair", REQUIRED, "Window size (kh, kw)"),
    Attr("stride", "pair", None, "Stride; defaults to the kernel size"),
    Attr("pad", "pads", 0, "Per-side padding (see module docs for the pad value)"),
    Attr("ceil_mode", "bool", False, "Ceil instead of floor for the output size (PyTorch rule)"),
)


def _pool_infer(shapes, a):
    _rank(shapes, 3, "pooling")
    C, H, W = shapes[0]
    a = {**a, "stride": a["stride"] or a["kernel"]}
    pads = resolve_pads(a["pad"], (H, W), a["kernel"], a["stride"])
    for p, k in zip(pads, (a["kernel"][0], a["kernel"][0], a["kernel"][1], a["kernel"][1])):
        if p >= k:
            raise SpecError(f"pad {p} must be smaller than the kernel {k}: a window would cover padding only")
    ho = pool_out(H, a["kernel"][0], a["stride"][0], pads[0], pads[1], a["ceil_mode"])
    wo = pool_out(W, a["kernel"][1], a["stride"][1], pads[2], pads[3], a["ceil_mode"])
    return (C, ho, wo), {**a, "pad": pads}


def _maxpool_ref(xs, p, a, ctx):
    x = xs[0]
    out_hw = _pool_out_hw(x.shape[2:], a)
    xp = _pool_pad(x, a, out_hw, -np.inf)
    return _windows(xp, a["kernel"], a["stride"], (1, 1), out_hw).max(axis=(-2, -1))


def _pool_out_hw(hw, a):
    t, b, l, r = a["pad"]
    return (pool_out(hw[0], a["kernel"][0], a["stride"][0], t, b, a["ceil_mode"]),
            pool_out(hw[1], a["kernel"][1], a["stride"][1], l, r, a["ceil_mode"]))


def _avgpool_ref(xs, p, a, ctx):
    x = xs[0]
    out_hw = _pool_out_hw(x.shape[2:], a)
    xp = _pool_pad(x, a, out_hw, 0.0)
    s = _windows(xp, a["kernel"], a["stride"], (1, 1), out_hw).sum(axis=(-2, -1))
    return s / avgpool_divisor(x.shape[2:], a, out_hw)


_POOL_CASES = (
    {"id": "2x2", "inputs": [(3, 8, 8)], "attrs": {"kernel": 2}},
    {"id": "3x3s2_pad1", "inputs": [(2, 9, 9)], "attrs": {"kernel": 3, "stride": 2, "pad": 1}},
    {"id": "3x3s2_ceil", "inputs": [(2, 8, 8)], "attrs": {"kernel": 3, "stride": 2, "ceil_mode": True}},
    {"id": "ceil_drops_window", "inputs": [(2, 5, 5)], "attrs": {"kernel": 2, "stride": 2, "pad": 1, "ceil_mode": True}},
    {"id": "ceil_pad1", "inputs": [(2, 10, 9)], "attrs": {"kernel": 3, "stride": 2, "pad": 1, "ceil_mode": True}},
    {"id": "asym_pads", "inputs": [(2, 7, 7)], "attrs": {"kernel": 3, "stride": 2, "pad": [0, 1, 0, 1]}},
    {"id": "same_stride2", "inputs": [(2, 8, 8)], "attrs": {"kernel": 3, "stride": 2, "pad": "same"}},
    {"id": "same_stride1", "inputs": [(2, 5, 5)], "attrs": {"kernel": 3, "stride": 1, "pad": "same"}},
)

MAXPOOL2D = OpSchema(
    name="maxpool2d",
    doc="Max pooling; pads count as -inf (never as zeros).",
    attrs=_POOL_ATTRS,
    arity=1,
    infer=_pool_infer,
    reference=_maxpool_ref,
    backward=_maxpool_backward,
    traits=frozenset({"argmax"}),
    cases=(*_POOL_CASES,
           # all-negative input: zero padding instead of -inf would show at every border
           {"id": "negative_input_asym", "inputs": [(2, 6, 6)], "attrs": {"kernel": 2, "stride": 1, "pad": [1, 0, 1, 0]},
            "shift": -4.0},
           {"id": "negative_input_sym", "inputs": [(2, 6, 6)], "attrs": {"kernel": 3, "stride": 2, "pad": 1},
            "shift": -4.0}),
)

AVGPOOL2D = OpSchema(
    name="avgpool2d",
    doc="Average pooling; the divisor is the window's elements inside the input plus pads "
    "(count_include_pad) or inside the input only; ceil-mode overhang never counts.",
    attrs=(*_POOL_ATTRS, Attr("count_include_pad", "bool", True,
                              "Count padded elements in the divisor (PyTorch True; TF SAME is False)")),
    arity=1,
    infer=_pool_infer,
    reference=_avgpool_ref,
    backward=_avgpool_backward,
    cases=(*_POOL_CASES,
           {"id": "exclude_pad", "inputs": [(2, 7, 7)],
            "attrs": {"kernel": 3, "stride": 1, "pad": 1, "count_include_pad": False}},
           {"id": "exclude_pad_ceil_asym", "inputs": [(2, 8, 9)],
            "attrs": {"kernel": 3, "stride": 2, "pad": [1, 0, 0, 1], "ceil_mode": True, "count_include_pad": False}},
           {"id": "include_pad_ceil_asym", "inputs": [(2, 8, 9)],
            "attrs": {"kernel": 3, "stride": 2, "pad": [1, 0, 0, 1], "ceil_mode": True}}),
)


def _adaptive_infer(shapes, a):
    _rank(shapes, 3, "adaptive_avgpool2d")
    return (shapes[0][0], *a["output_size"]), a


def _adaptive_ref(xs, p, a, ctx):
    x = xs[0]
    mh = adaptive_pool_matrix(x.shape[2], a["output_size"][0])
    mw = adaptive_pool_matrix(x.shape[3], a["output_size"][1])
    return np.einsum("nchw,ih,jw->ncij", x, mh, mw)


ADAPTIVE_AVGPOOL2D = OpSchema(
    name="adaptive_avgpool2d",
    doc="PyTorch's adaptive average pooling to a fixed output size: bin i of n_out over n_in "
    "covers [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)); bins may overlap or repeat input.",
    attrs=(Attr("output_size", "pair", REQUIRED, "Output size (ho, wo)"),),
    arity=1,
    infer=_adaptive_infer,
    reference=_adaptive_ref,
    backward=_adaptive_backward,
    cases=(
        {"id": "identity", "inputs": [(3, 6, 6)], "attrs": {"output_size": 6}},
        {"id": "down_uneven", "inputs": [(3, 7, 9)], "attrs": {"output_size": [3, 4]}},
        {"id": "up", "inputs": [(3, 2, 3)], "attrs": {"output_size": 7}},
    ),
)

GLOBAL_AVGPOOL = OpSchema(
    name="global_avgpool",
    doc="Mean over H and W, keeping them: (C, H, W) -> (C, 1, 1).",
    attrs=(),
    arity=1,
    infer=lambda s, a: (_rank(s, 3, "global_avgpool"), ((s[0][0], 1, 1), a))[1],
    reference=lambda xs, p, a, ctx: xs[0].mean(axis=(2, 3), keepdims=True),
    backward=_global_avgpool_backward,
    cases=({"inputs": [(4, 5, 6)], "attrs": {}},),
)

FLATTEN = OpSchema(
    name="flatten",
    doc="(C, H, W) -> (C*H*W,) in C, H, W order (NHWC backends must keep this order).",
    attrs=(),
    arity=1,
    infer=lambda s, a: ((int(np.prod(s[0])),), a),
    reference=lambda xs, p, a, ctx: xs[0].reshape(xs[0].shape[0], -1),
    backward=lambda xs, p, a, y, dy, ctx: ([dy.reshape(xs[0].shape)], {}),
    cases=({"inputs": [(3, 4, 5)], "attrs": {}}, {"id": "1x1", "inputs": [(6, 1, 1)], "attrs": {}}),
)

# --------------------------------------------------------------------------- regularisers


def _dropout_ref(xs, p, a, ctx: RefContext):
    x = xs[0]
    if not ctx.train or a["rate"] == 0:
        return x
    return x * ctx.mask(x.shape, a["rate"]) / (1.0 - a["rate"])


def _drop_path_ref(xs, p, a, ctx: RefContext):
    x = xs[0]
    if not ctx.train or not a["rate"]:
        return x
    keep = ctx.mask((x.shape[0],), a["rate"]).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * keep / (1.0 - a["rate"])


DROPOUT = OpSchema(
    name="dropout",
    doc="Inverted dropout: train y = x * mask / (1 - rate), mask ~ Bernoulli(1 - rate) per "
    "element; eval y = x.",
    attrs=(Attr("rate", "rate", 0.5, "Probability of dropping an element"),),
    arity=1,
    infer=_same,
    reference=_dropout_ref,
    backward=_mask_backward,
    traits=frozenset({"stochastic", "train_only", "passthrough"}),
    cases=({"inputs": [(10,)], "attrs": {"rate": 0.5}},),
)

DROP_PATH = OpSchema(
    name="drop_path",
    doc="Stochastic depth on a residual branch: train y = x * mask / (1 - rate), one "
    "Bernoulli(1 - rate) per sample; eval y = x. A null rate takes the spec's drop_path "
    "schedule (linear from start to end over the drop_path nodes in order).",
    attrs=(Attr("rate", "rate", None, "Probability of dropping the branch for a sample"),),
    arity=1,
    infer=_same,
    reference=_drop_path_ref,
    backward=_mask_backward,
    traits=frozenset({"stochastic", "train_only", "passthrough", "scheduled_rate"}),
    cases=({"inputs": [(3, 4, 4)], "attrs": {"rate": 0.2}},),
)

# --------------------------------------------------------------------------- lrn


def _lrn_ref(xs, p, a, ctx):
    x = xs[0]
    n = a["size"]
    sq = np.pad(x * x, ((0, 0), (n // 2, (n - 1) // 2), (0, 0), (0, 0)))
    s = np.lib.stride_tricks.sliding_window_view(sq, n, axis=1).sum(axis=-1)
    return x * (a["k"] + a["alpha"] * s) ** (-a["beta"])


LRN = OpSchema(
    name="lrn",
    doc="Local response normalisation across channels, the paper's formula: "
    "b_c = a_c / (k + alpha * sum_{c'=c-floor(n/2)}^{c+ceil(n/2)-1} a_{c'}^2)^beta, "
    "out-of-range channels 0. alpha is NOT divided by n (PyTorch's LocalResponseNorm "
    "divides: give it alpha*n; TF's depth_radius=(n-1)/2 takes alpha as is, odd n).",
    attrs=(
        Attr("size", "int", 5, "Channels in the window (n)", minimum=1),
        Attr("alpha", "float", 1e-4, "Scale of the sum of squares (not divided by n)"),
        Attr("beta", "float", 0.75, "Exponent"),
        Attr("k", "float", 2.0, "Additive constant"),
    ),
    arity=1,
    infer=lambda s, a: (_rank(s, 3, "lrn"), (s[0], a))[1],
    reference=_lrn_ref,
    backward=_lrn_backward,
    cases=(
        {"id": "paper", "inputs": [(7, 4, 4)], "attrs": {}, "scale": 10.0},
        {"id": "size3_k1", "inputs": [(4, 3, 3)], "attrs": {"size": 3, "k": 1.0, "alpha": 0.01, "beta": 0.5},
         "scale": 3.0},
    ),
)

# --------------------------------------------------------------------------- merges


def _concat_infer(shapes, a):
    first = shapes[0]
    for s in shapes[1:]:
        if len(s) != len(first) or s[1:] != first[1:]:
            raise SpecError(f"concat inputs differ outside the channel axis: "
                            f"{', '.join(fmt_shape(x) for x in shapes)}")
    return (sum(s[0] for s in shapes), *first[1:]), a


def _add_infer(shapes, a):
    if any(s != shapes[0] for s in shapes[1:]):
        raise SpecError(f"add inputs have different shapes: {', '.join(fmt_shape(x) for x in shapes)}")
    return shapes[0], a


def _mul_infer(shapes, a):
    try:
        out = np.broadcast_shapes(*shapes)
    except ValueError:
        raise SpecError(f"mul inputs cannot broadcast: {', '.join(fmt_shape(x) for x in shapes)}") from None
    if out not in [tuple(s) for s in shapes]:
        raise SpecError(f"mul output {fmt_shape(out)} must equal one input's shape, got "
                        f"{', '.join(fmt_shape(x) for x in shapes)}")
    return tuple(out), a


CONCAT = OpSchema(
    name="concat",
    doc="Concatenate along the channel axis; spatial sizes must match.",
    attrs=(),
    arity=-1,
    infer=_concat_infer,
    reference=lambda xs, p, a, ctx: np.concatenate(xs, axis=1),
    backward=_concat_backward,
    cases=({"inputs": [(2, 4, 4), (3, 4, 4)], "attrs": {}},
           {"id": "three", "inputs": [(1, 3, 3), (2, 3, 3), (3, 3, 3)], "attrs": {}}),
)

ADD = OpSchema(
    name="add",
    doc="Element-wise sum of two or more inputs of equal shape.",
    attrs=(),
    arity=-1,
    infer=_add_infer,
    reference=lambda xs, p, a, ctx: sum(xs[1:], xs[0]),
    backward=lambda xs, p, a, y, dy, ctx: ([dy] * len(xs), {}),
    traits=frozenset({"residual_sum"}),
    cases=({"inputs": [(3, 4, 4), (3, 4, 4)], "attrs": {}},
           {"id": "three", "inputs": [(5,), (5,), (5,)], "attrs": {}}),
)

MUL = OpSchema(
    name="mul",
    doc="Element-wise product of two inputs with numpy broadcasting, e.g. (C, H, W) * (C, 1, 1) "
    "for squeeze-and-excitation; the output has one input's shape.",
    attrs=(),
    arity=2,
    infer=_mul_infer,
    reference=lambda xs, p, a, ctx: xs[0] * xs[1],
    backward=_mul_backward,
    cases=({"id": "broadcast_se", "inputs": [(4, 5, 5), (4, 1, 1)], "attrs": {}},
           {"id": "broadcast_first", "inputs": [(4, 1, 1), (4, 3, 3)], "attrs": {}},
           {"id": "same", "inputs": [(3, 2, 2), (3, 2, 2)], "attrs": {}}),
)

SCALE = _elementwise(
    "scale", "y = factor * x (Inception-ResNet residual scaling)", lambda x, a: x * a["factor"],
    lambda x, y, a: a["factor"],
    attrs=(Attr("factor", "float", REQUIRED, "Constant multiplier"),),
    cases=({"inputs": [(3, 4, 4)], "attrs": {"factor": 0.17}},),
    traits=frozenset({"passthrough"}),
)

# --------------------------------------------------------------------------- channel ops


def _shuffle_infer(shapes, a):
    _rank(shapes, 3, "channel_shuffle")
    if shapes[0][0] % a["groups"]:
        raise SpecError(f"channels {shapes[0][0]} not divisible by groups {a['groups']}")
    return shapes[0], a


def _shuffle_ref(xs, p, a, ctx):
    x = xs[0]
    N, C, H, W = x.shape
    g = a["groups"]
    return x.reshape(N, g, C // g, H, W).transpose(0, 2, 1, 3, 4).reshape(N, C, H, W)


def _split_infer(shapes, a):
    C = shapes[0][0]
    if a["index"] >= a["parts"]:
        raise SpecError(f"index {a['index']} out of range for {a['parts']} parts")
    if C % a["parts"]:
        raise SpecError(f"channels {C} not divisible into {a['parts']} parts")
    return (C // a["parts"], *shapes[0][1:]), a


def _split_ref(xs, p, a, ctx):
    x = xs[0]
    step = x.shape[1] // a["parts"]
    return x[:, a["index"] * step : (a["index"] + 1) * step]


CHANNEL_SHUFFLE = OpSchema(
    name="channel_shuffle",
    doc="ShuffleNet shuffle: reshape (groups, C/groups), transpose, flatten.",
    attrs=(Attr("groups", "int", REQUIRED, "Number of groups", minimum=1),),
    arity=1,
    infer=_shuffle_infer,
    reference=_shuffle_ref,
    backward=_shuffle_backward,
    cases=({"inputs": [(6, 3, 3)], "attrs": {"groups": 2}}, {"id": "g3", "inputs": [(6, 2, 2)], "attrs": {"groups": 3}}),
)

CHANNEL_SPLIT = OpSchema(
    name="channel_split",
    doc="Takes part `index` of `parts` equal channel slices (torch.chunk along channels).",
    attrs=(Attr("parts", "int", 2, "Number of equal parts", minimum=1),
           Attr("index", "int", REQUIRED, "Which part, from 0", minimum=0)),
    arity=1,
    infer=_split_infer,
    reference=_split_ref,
    backward=_split_backward,
    cases=({"id": "first", "inputs": [(6, 3, 3)], "attrs": {"index": 0}},
           {"id": "second", "inputs": [(6, 3, 3)], "attrs": {"index": 1}},
           {"id": "third_of_3", "inputs": [(6, 2, 2)], "attrs": {"parts": 3, "index": 2}}),
)


def _zeropad_infer(shapes, a):
    _rank(shapes, 3, "zeropad2d")
    if a["pad"] == "same":
        raise SpecError("zeropad2d needs explicit pads")
    t, b, l, r = a["pad"]
    C, H, W = shapes[0]
    return (C, H + t + b, W + l + r), a


ZEROPAD2D = OpSchema(
    name="zeropad2d",
    doc="Zero padding per side (top, bottom, left, right).",
    attrs=(Attr("pad", "pads", REQUIRED, "Per-side pads"),),
    arity=1,
    infer=_zeropad_infer,
    reference=lambda xs, p, a, ctx: np.pad(xs[0], ((0, 0), (0, 0), a["pad"][:2], a["pad"][2:])),
    backward=_zeropad_backward,
    cases=({"inputs": [(2, 3, 3)], "attrs": {"pad": [0, 1, 0, 1]}},
           {"id": "sym", "inputs": [(2, 3, 4)], "attrs": {"pad": [2, 1]}}),
)

INPUT = OpSchema(
    name="input",
    doc="The model input (internal; not written in specs).",
    attrs=(),
    arity=0,
    infer=lambda s, a: ((), a),
    reference=lambda xs, p, a, ctx: xs[0],
    traits=frozenset({"internal"}),
)

OPS: dict[str, OpSchema] = {
    op.name: op
    for op in (
        CONV2D, LINEAR, BATCHNORM, RELU, RELU6, LEAKY_RELU, SIGMOID, TANH, HARDSWISH, HARDSIGMOID,
        SILU, GELU, SOFTMAX, MAXPOOL2D, AVGPOOL2D, ADAPTIVE_AVGPOOL2D, GLOBAL_AVGPOOL, FLATTEN, DROPOUT,
        DROP_PATH, LRN, CONCAT, ADD, MUL, SCALE, CHANNEL_SHUFFLE, CHANNEL_SPLIT, IDENTITY, ZEROPAD2D, INPUT,
    )
}
"""The op table, by name; every op but ``input`` (the graph's entry) may appear in specs."""

INPUT_OP = INPUT.name
"""The graph's entry node's op."""


def ops_with(trait: str) -> frozenset[str]:
    """Names of the ops carrying ``trait`` (one of TRAITS)."""
    if trait not in TRAITS:
        raise KeyError(f"unknown op trait '{trait}' (known: {', '.join(TRAITS)})")
    return frozenset(name for name, op in OPS.items() if trait in op.traits)


def spec_ops() -> list[str]:
    """The ops a spec may use: every op but the internal ones; what every backend builds."""
    return [name for name, op in OPS.items() if "internal" not in op.traits]


def resolve_attrs(op: OpSchema, raw: dict) -> dict:
    """Checks raw attributes against the op and fills in defaults.

    Raises:
        SpecError: with the attribute name as path suffix (``.kernel``) in ``path``.
    """
    out = {}
    for key, value in raw.items():
        attr = op.attr(key)
        if attr is None:
            known = ", ".join(a.name for a in op.attrs) or "none"
            raise SpecError(f"unknown attribute '{key}' for op {op.name} (known: {known})", path="." + key)
        try:
            out[key] = parse_attr(attr, value)
        except SpecError as e:
            raise SpecError(f"{op.name} attribute '{key}': {e.reason}", path="." + key) from None
    for attr in op.attrs:
        if attr.name not in out:
            if attr.default is REQUIRED:
                raise SpecError(f"op {op.name} needs attribute '{attr.name}' ({attr.doc})")
            out[attr.name] = None if attr.default is None else parse_attr(attr, attr.default)
    return out
