"""The IR as a Keras 3 functional model: the builder shared by the Keras backends.

Three backends run the same Keras model: ``tf`` (Keras on TensorFlow, backends/tf),
``keras-torch`` and ``keras-jax`` (Keras on PyTorch and on JAX). This module holds what they
share: one Keras layer (or a few) per IR node, built by the one builder table ``BUILDERS``,
and the canonical <-> Keras weight layouts. The layer classes are backends/keras/layers.py's,
written in ``keras.ops``; a backend may replace some with faster ones for its own framework
(the tf backend runs TF's fused batch norm, BiasAdd in the layer's data format and tf.nn
pooling in NCHW): the builder takes the classes from the :class:`LayerSet` it is given.
KERAS_BACKEND must be set before this module is imported (the importing backend does it).

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
    * Layer names: samenet.graph.layer_names with "." as "_" (Keras on torch keeps variables
      in a torch ParameterDict, whose keys cannot contain "."); helper layers add a suffix
      (``_pad``, ``_to_chw``, ``_divisor``), made unique.
    * Padding: Keras "same" is used only where it is provably identical, i.e. when the
      node's resolved pads equal samenet.ops.same_pads on both axes (and, for pooling, the
      output size and the divisor map agree too). Everything else is explicit: a
      ZeroPadding2D before the conv / average pool, a -inf pad before max pooling, each with
      the extra bottom/right pad of a ceil-mode overhang, then "valid" pooling. Average
      pooling whose divisor map (samenet.ops.avgpool_divisor) is not the constant kh*kw is
      corrected by a constant factor map kh*kw / divisor after the valid pool.
    * adaptive_avgpool2d: a plain AveragePooling2D when the bins tile the input exactly,
      otherwise the exact averaging matrices of samenet.ops.adaptive_pool_matrix (einsum).
    * flatten keeps C, H, W order: in NHWC a Permute((3, 1, 2)) precedes the Flatten (it is
      skipped when H*W == 1 or C == 1, where both orders agree). The linear layer that
      follows keeps the canonical weight, only transposed.
    * BatchNorm (generic): Keras' own BatchNormalization with momentum 1 - m (the IR's m is
      PyTorch's) and eps as given. Keras updates the running variance with the *biased*
      batch variance, so the generic backends declare ``bn_variance = "biased"``.
    * LRN: an exact window sum of squares (n // 2 channels before, (n - 1) // 2 after).
    * gelu: the exact erf form (``keras.ops.gelu(approximate=False)``).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from samenet.errors import UnsupportedError
from samenet.graph import BuildContext, layer_names, missing_builders, schedule
from samenet.ops import adaptive_pool_matrix, avgpool_divisor, same_pads

from .layers import GENERIC, LayerSet

POLICIES = {"fp32": "float32", "tf32": "float32", "amp-bf16": "mixed_bfloat16", "amp-fp16": "mixed_float16",
            "fp64": "float64"}
"""Keras dtype policy per precision; fp64 (samenet.backend.VERIFY_PRECISION) where a backend
declares the fp64 capability: tf and keras-torch (JAX computes float64 only with x64 enabled)."""


class Unset(keras.initializers.Initializer):
    """Host zeros as a variable's initial value: the harness's canonical weights replace every
    IR parameter (``set_weights``) before anything runs, so drawing values is wasted work. On
    Keras' JAX backend each random initializer of a new shape is an XLA compilation (MobileNetV3-
    Large: 65 compiles of jax.random.uniform, 21 s of a 27 s build); host zeros are a transfer."""

    def __call__(self, shape, dtype=None):
        return np.zeros(shape, dtype=keras.backend.standardize_dtype(dtype or "float32"))


UNSET = Unset()


class KerasContext(BuildContext):
    """Build state: layout, dtype policy, layer classes, unique layer names, the canonical
    parameter map, the mask layers and ``inputs``, the Keras tensors of the node being built."""

    def __init__(self, ir, config, layers: LayerSet, label: str, strided_dilation: bool, same_avgpool: bool):
        super().__init__(ir, config)
        self.cl = config.options.get("layout", "channels_last") == "channels_last"
        self.dtype = keras.DTypePolicy(POLICIES[config.precision])
        self.L = layers
        self.label = label  # the backend's name, for error messages
        self.strided_dilation = strided_dilation  # convolutions may combine stride > 1 and dilation > 1
        self.same_avgpool = same_avgpool  # Keras' "same" average pooling excludes the pads from the divisor
        self.data_format = "channels_last" if self.cl else "channels_first"
        self.node_names = layer_names(ir, label, sep="_")
        self.names: set[str] = set(self.node_names.values())
        self.params: dict[str, tuple] = {}  # canonical name -> (variable, to_native, from_native)
        self.mask_layers: dict[str, Any] = {}  # node name -> its Dropout / DropPath layer
        self.inputs: list = []

    def unique(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... when a layer already has that name."""
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def kw(self, node, suffix: str = "") -> dict:
        """Name and dtype policy of the node's layer (a helper layer with ``suffix``)."""
        name = self.node_names[node.name]
        return {"name": self.unique(name + suffix) if suffix else name, "dtype": self.dtype}

    @staticmethod
    def unset(*arguments: str) -> dict:
        """Keyword arguments that give the named initializers of a layer ``Unset``."""
        return {name + "_initializer": UNSET for name in arguments}

    def chan_axis(self, shape) -> int:
        return (-1 if self.cl else 1) if len(shape) == 3 else -1

    def native_hw(self, hw_map: np.ndarray) -> np.ndarray:
        """(Ho, Wo) -> broadcastable (1, Ho, Wo, 1) or (1, 1, Ho, Wo)."""
        return hw_map[None, :, :, None] if self.cl else hw_map[None, None, :, :]

    def zero_pad(self, node, pads, suffix: str = ""):
        """A ZeroPadding2D layer, pads (top, bottom, left, right)."""
        t, b, l, r = pads
        return keras.layers.ZeroPadding2D(((t, b), (l, r)), data_format=self.data_format, **self.kw(node, suffix))


# --------------------------------------------------------------------------- op builders


def _depthwise(node, ctx: KerasContext, x, C: int, common: dict):
    mult = node.attrs["out_channels"] // C
    layer = ctx.L.DepthwiseConv2D(tuple(node.attrs["kernel"]), depth_multiplier=mult, **common,
                                  **ctx.unset("depthwise", "bias"))
    y = layer(x)
    to_native = lambda w, C=C, m=mult: w.reshape(C, m, w.shape[2], w.shape[3]).transpose(2, 3, 0, 1)
    from_native = lambda k, C=C, m=mult: k.transpose(2, 3, 0, 1).reshape(C * m, 1, k.shape[0], k.shape[1])
    ctx.params[node.name + ".weight"] = (layer.kernel, to_native, from_native)
    return layer, y


def build_conv2d(node, ctx: KerasContext):
    a = node.attrs
    (C, H, W), = ctx.in_shapes(node)
    (kh, kw), (sh, sw), (dh, dw) = a["kernel"], a["stride"], a["dilation"]
    pads = tuple(a["pad"])
    if max(sh, sw) > 1 and max(dh, dw) > 1 and not ctx.strided_dilation:
        raise UnsupportedError(f"{ctx.label} backend: {node.name}: convolutions cannot combine stride > 1 with "
                               "dilation > 1 here")
    x = ctx.inputs[0]
    if pads[:2] == same_pads(H, kh, sh, dh) and pads[2:] == same_pads(W, kw, sw, dw) and pads != (0, 0, 0, 0):
        padding = "same"
    else:
        padding = "valid"
        if pads != (0, 0, 0, 0):
            x = ctx.zero_pad(node, pads, "_pad")(x)
    common = dict(strides=(sh, sw), padding=padding, dilation_rate=(dh, dw), use_bias=a["bias"],
                  data_format=ctx.data_format, **ctx.kw(node))
    if a["groups"] == C and C > 1:
        layer, y = _depthwise(node, ctx, x, C, common)
    else:
        layer = ctx.L.Conv2D(a["out_channels"], (kh, kw), groups=a["groups"], **common, **ctx.unset("kernel", "bias"))
        y = layer(x)
        ctx.params[node.name + ".weight"] = (layer.kernel, lambda w: w.transpose(2, 3, 1, 0),
                                             lambda k: k.transpose(3, 2, 0, 1))
    if a["bias"]:
        ctx.params[node.name + ".bias"] = (layer.bias, None, None)
    return y


def build_linear(node, ctx: KerasContext):
    a = node.attrs
    layer = keras.layers.Dense(a["out_features"], use_bias=a["bias"], **ctx.kw(node), **ctx.unset("kernel", "bias"))
    y = layer(ctx.inputs[0])
    ctx.params[node.name + ".weight"] = (layer.kernel, lambda w: w.T, lambda k: k.T)
    if a["bias"]:
        ctx.params[node.name + ".bias"] = (layer.bias, None, None)
    return y


def build_batchnorm(node, ctx: KerasContext):
    a = node.attrs
    layer = ctx.L.BatchNorm(a["momentum"], axis=ctx.chan_axis(ctx.in_shapes(node)[0]), epsilon=a["eps"],
                            center=a["center"], scale=a["scale"], **ctx.kw(node),
                            **ctx.unset("beta", "gamma", "moving_mean", "moving_variance"))
    y = layer(ctx.inputs[0])
    if a["scale"]:
        ctx.params[node.name + ".weight"] = (layer.gamma, None, None)
    if a["center"]:
        ctx.params[node.name + ".bias"] = (layer.beta, None, None)
    ctx.params[node.name + ".running_mean"] = (layer.moving_mean, None, None)
    ctx.params[node.name + ".running_var"] = (layer.moving_variance, None, None)
    return y


def build_relu(node, ctx: KerasContext):
    return keras.layers.ReLU(**ctx.kw(node))(ctx.inputs[0])


def build_relu6(node, ctx: KerasContext):
    return keras.layers.ReLU(max_value=6.0, **ctx.kw(node))(ctx.inputs[0])


def build_leaky_relu(node, ctx: KerasContext):
    return keras.layers.LeakyReLU(negative_slope=node.attrs["negative_slope"], **ctx.kw(node))(ctx.inputs[0])


ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "hardswish": "hard_swish", "hardsigmoid": "hard_sigmoid",
               "silu": "silu"}
"""Ops that are a keras.layers.Activation, by Keras' activation name."""


def build_activation(node, ctx: KerasContext):
    return keras.layers.Activation(ACTIVATIONS[node.op], **ctx.kw(node))(ctx.inputs[0])


def build_gelu(node, ctx: KerasContext):
    return ctx.L.Gelu(**ctx.kw(node))(ctx.inputs[0])


def build_softmax(node, ctx: KerasContext):
    return keras.layers.Softmax(axis=ctx.chan_axis(ctx.in_shapes(node)[0]), **ctx.kw(node))(ctx.inputs[0])


def _pool_plan(node, ctx: KerasContext, kind: str):
    """(padding "SAME"/"VALID", effective pads, divisor factor map or None) of a pooling node."""
    a = node.attrs
    (C, H, W), = ctx.in_shapes(node)
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
    if same_ok and eff != (0, 0, 0, 0):
        return "SAME", eff, factor
    Hp, Wp = H + eff[0] + eff[1], W + eff[2] + eff[3]
    if ((Hp - kh) // sh + 1, (Wp - kw) // sw + 1) != (Ho, Wo):
        raise UnsupportedError(f"{ctx.label} backend: {node.name}: pooling output size mismatch (internal)")
    return "VALID", eff, factor


def _pool(node, ctx: KerasContext, kind: str):
    kernel, stride = tuple(node.attrs["kernel"]), tuple(node.attrs["stride"])
    padding, eff, factor = _pool_plan(node, ctx, kind)
    x = ctx.inputs[0]
    if padding == "VALID" and eff != (0, 0, 0, 0):
        if kind == "max":
            x = ctx.L.Pad(eff, -math.inf, ctx.cl, **ctx.kw(node, "_pad"))(x)
        else:
            x = ctx.zero_pad(node, eff, "_pad")(x)
    if not ctx.cl:
        return ctx.L.Pool(kind, kernel, stride, padding, False, factor, **ctx.kw(node))(x)
    cls = keras.layers.MaxPooling2D if kind == "max" else keras.layers.AveragePooling2D
    y = cls(kernel, stride, padding=padding.lower(), data_format=ctx.data_format, **ctx.kw(node))(x)
    if factor is not None:
        y = ctx.L.Rescale(factor, **ctx.kw(node, "_divisor"))(y)
    return y


def build_maxpool2d(node, ctx: KerasContext):
    return _pool(node, ctx, "max")


def build_avgpool2d(node, ctx: KerasContext):
    return _pool(node, ctx, "avg")


def build_adaptive_avgpool2d(node, ctx: KerasContext):
    (C, H, W), = ctx.in_shapes(node)
    oh, ow = node.attrs["output_size"]
    x = ctx.inputs[0]
    if (oh, ow) == (1, 1):
        return keras.layers.GlobalAveragePooling2D(data_format=ctx.data_format, keepdims=True, **ctx.kw(node))(x)
    if H % oh == 0 and W % ow == 0:
        k = (H // oh, W // ow)
        if k == (1, 1):
            return keras.layers.Identity(**ctx.kw(node))(x)
        if ctx.cl:
            return keras.layers.AveragePooling2D(k, k, padding="valid", data_format=ctx.data_format,
                                                 **ctx.kw(node))(x)
        return ctx.L.Pool("avg", k, k, "VALID", False, None, **ctx.kw(node))(x)
    return ctx.L.AdaptiveAvgPool(adaptive_pool_matrix(H, oh), adaptive_pool_matrix(W, ow), ctx.cl,
                                 **ctx.kw(node))(x)


def build_global_avgpool(node, ctx: KerasContext):
    return keras.layers.GlobalAveragePooling2D(data_format=ctx.data_format, keepdims=True,
                                               **ctx.kw(node))(ctx.inputs[0])


def build_flatten(node, ctx: KerasContext):
    x = ctx.inputs[0]
    s = ctx.in_shapes(node)[0]
    if ctx.cl and len(s) == 3 and s[0] > 1 and s[1] * s[2] > 1:
        x = keras.layers.Permute((3, 1, 2), **ctx.kw(node, "_to_chw"))(x)
    return keras.layers.Flatten(data_format="channels_last", **ctx.kw(node))(x)


def build_dropout(node, ctx: KerasContext):
    layer = ctx.L.Dropout(node.attrs["rate"], **ctx.kw(node))
    ctx.mask_layers[node.name] = layer
    return layer(ctx.inputs[0])


def build_drop_path(node, ctx: KerasContext):
    layer = ctx.L.DropPath(node.attrs["rate"], **ctx.kw(node))
    ctx.mask_layers[node.name] = layer
    return layer(ctx.inputs[0])


def build_lrn(node, ctx: KerasContext):
    a = node.attrs
    return ctx.L.LRN(a["size"], a["alpha"], a["beta"], a["k"], ctx.cl, **ctx.kw(node))(ctx.inputs[0])


def build_concat(node, ctx: KerasContext):
    return keras.layers.Concatenate(axis=ctx.chan_axis(ctx.in_shapes(node)[0]), **ctx.kw(node))(list(ctx.inputs))


def build_add(node, ctx: KerasContext):
    return keras.layers.Add(**ctx.kw(node))(list(ctx.inputs))


def build_mul(node, ctx: KerasContext):
    shapes = ctx.in_shapes(node)
    if len(shapes[0]) != len(shapes[1]):
        raise UnsupportedError(f"{ctx.label} backend: {node.name}: mul of inputs of different ranks")
    return keras.layers.Multiply(**ctx.kw(node))(list(ctx.inputs))


def build_scale(node, ctx: KerasContext):
    return ctx.L.Rescale(node.attrs["factor"], **ctx.kw(node))(ctx.inputs[0])


def build_channel_shuffle(node, ctx: KerasContext):
    return ctx.L.ChannelShuffle(node.attrs["groups"], ctx.cl, **ctx.kw(node))(ctx.inputs[0])


def build_channel_split(node, ctx: KerasContext):
    a = node.attrs
    shape = ctx.in_shapes(node)[0]
    step = shape[0] // a["parts"]
    axis = 1 if ctx.chan_axis(shape) == 1 else -1
    return ctx.L.ChannelSlice(a["index"] * step, (a["index"] + 1) * step, axis, **ctx.kw(node))(ctx.inputs[0])


def build_identity(node, ctx: KerasContext):
    return keras.layers.Identity(**ctx.kw(node))(ctx.inputs[0])


def build_zeropad2d(node, ctx: KerasContext):
    return ctx.zero_pad(node, node.attrs["pad"])(ctx.inputs[0])


BUILDERS = {
    "conv2d": build_conv2d,
    "linear": build_linear,
    "batchnorm": build_batchnorm,
    "relu": build_relu,
    "relu6": build_relu6,
    "leaky_relu": build_leaky_relu,
    "sigmoid": build_activation,
    "tanh": build_activation,
    "hardswish": build_activation,
    "hardsigmoid": build_activation,
    "silu": build_activation,
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
"""Op -> builder ``(node, ctx)``: adds the node's layer(s) to the graph, returns its output."""


# --------------------------------------------------------------------------- the model


class KerasModel:
    """A built IR: the Keras models, canonical parameter map and mask layers.

    ``train_model`` has every output (main and aux heads); ``eval_model`` shares its layers
    and has the main output only, so train-only nodes never run in inference.
    """

    def __init__(self, ir, config, layers: LayerSet = GENERIC, label: str = "keras",
                 strided_dilation: bool = True, same_avgpool: bool = True):
        missing_builders(ir, BUILDERS, label)
        ctx = KerasContext(ir, config, layers, label, strided_dilation, same_avgpool)
        self.ir, self.channels_last = ir, ctx.cl
        inp = keras.Input(shape=self.native_shape(ir.input_shape), name=ctx.unique("input"), dtype="float32")
        plan = schedule(ir, train=True)
        outs = plan.run(inp, lambda index, inputs: self._build_node(ctx, ir.nodes[index], inputs))
        self.train_model = keras.Model(inp, outs, name=f"{ir.name}_train")
        self.eval_model = keras.Model(inp, outs[0], name=ir.name)
        missing = set(ir.params) - set(ctx.params)
        if missing:
            raise UnsupportedError(f"{label} backend: parameters without a variable: {sorted(missing)[:5]}")
        self.params = {name: ctx.params[name] for name in ir.params}
        self.mask_layers = ctx.mask_layers
        self.aux_weights = [float(weight) for _, weight in plan.aux]

    @staticmethod
    def _build_node(ctx: KerasContext, node, inputs):
        ctx.inputs = inputs
        return BUILDERS[node.op](node, ctx)

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
