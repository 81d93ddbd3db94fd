"""Seeded initialisation of canonical weights, and the weights file format.

Every parameter draws from its own stream, seeded by ``(seed, crc32(parameter name))``, so
the weights do not depend on node order or on which other parameters exist. Only uniform
doubles are taken from numpy (PCG64's ``random``, stable across numpy versions); normals
come from a Box-Muller transform written here, so the same seed gives the same bytes in
every tox env, whatever its numpy.

Weights files are ``.npz`` of float32 arrays in canonical layout keyed by parameter name,
read with ``allow_pickle=False``.

Initializer kinds (``{"kind": ..., params}`` or just the kind's name as a string):

================  ==========================================================================
kind              meaning
================  ==========================================================================
zeros, ones       constants 0 and 1
constant          ``value``
uniform           U(``low``, ``high``)
normal            N(``mean``=0, ``std``)
truncated_normal  N(``mean``=0, ``std``) redrawn outside [``a``, ``b``] (default mean +- 2 std)
kaiming_uniform   U(-g sqrt(3/fan), +): g from ``nonlinearity`` (relu, leaky_relu with ``a``,
                  linear), fan from ``mode`` (fan_in, fan_out); PyTorch's default for conv
                  and linear weights is ``a = sqrt(5)``, i.e. U(-1/sqrt(fan_in), +)
kaiming_normal    N(0, g / sqrt(fan)), same arguments
glorot_uniform    U(-sqrt(6 / (fan_in + fan_out)), +) (Keras' default kernel initializer)
glorot_normal     N(0, sqrt(2 / (fan_in + fan_out)))
uniform_fan_in    U(-1/sqrt(fan_in), +): PyTorch's default conv and linear bias
variance_scaling  Keras: ``scale``, ``mode`` (fan_in, fan_out, fan_avg), ``distribution``
                  (truncated_normal with Keras' 0.8796 correction, untruncated_normal, uniform)
================  ==========================================================================

Fans follow PyTorch: conv fan_in = in_channels / groups * kh * kw, fan_out = out_channels * kh
* kw; a bias uses its weight's fans.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import SpecError

_KINDS: dict[str, tuple[dict, Callable[..., np.ndarray]]] = {}


def _kind(name: str, **defaults):
    def register(fn):
        _KINDS[name] = (defaults, fn)
        return fn

    return register


def _uniform(rng: np.random.Generator, shape, low: float, high: float) -> np.ndarray:
    return low + (high - low) * rng.random(shape)


def _normal(rng: np.random.Generator, shape) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    half = (n + 1) // 2
    u1 = 1.0 - rng.random(half)  # (0, 1]
    u2 = rng.random(half)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return z.reshape(shape)


def _truncated(rng, shape, mean, std, a, b) -> np.ndarray:
    out = mean + std * _normal(rng, shape)
    bad = (out < a) | (out > b)
    while bad.any():
        out[bad] = mean + std * _normal(rng, (int(bad.sum()),))
        bad = (out < a) | (out > b)
    return out


def _gain(nonlinearity: str, a: float) -> float:
    return {"relu": math.sqrt(2.0), "linear": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3,
            "leaky_relu": math.sqrt(2.0 / (1 + a * a))}[nonlinearity]


@_kind("zeros")
def _zeros(rng, shape, fi, fo):
    return np.zeros(shape)


@_kind("ones")
def _ones(rng, shape, fi, fo):
    return np.ones(shape)


@_kind("constant", value=None)
def _constant(rng, shape, fi, fo, value):
    return np.full(shape, float(value))


@_kind("uniform", low=None, high=None)
def _uniform_init(rng, shape, fi, fo, low, high):
    return _uniform(rng, shape, low, high)


@_kind("normal", mean=0.0, std=None)
def _normal_init(rng, shape, fi, fo, mean, std):
    return mean + std * _normal(rng, shape)


@_kind("truncated_normal", mean=0.0, std=None, a=None, b=None)
def _trunc_init(rng, shape, fi, fo, mean, std, a, b):
    a = mean - 2 * std if a is None else a
    b = mean + 2 * std if b is None else b
    return _truncated(rng, shape, mean, std, a, b)


@_kind("kaiming_uniform", a=0.0, mode="fan_in", nonlinearity="leaky_relu")
def _ku(rng, shape, fi, fo, a, mode, nonlinearity):
    bound = _gain(nonlinearity, a) * math.sqrt(3.0 / (fi if mode == "fan_in" else fo))
    return _uniform(rng, shape, -bound, bound)


@_kind("kaiming_normal", a=0.0, mode="fan_in", nonlinearity="leaky_relu")
def _kn(rng, shape, fi, fo, a, mode, nonlinearity):
    std = _gain(nonlinearity, a) / math.sqrt(fi if mode == "fan_in" else fo)
    return std * _normal(rng, shape)


@_kind("glorot_uniform")
def _gu(rng, shape, fi, fo):
    bound = math.sqrt(6.0 / (fi + fo))
    return _uniform(rng, shape, -bound, bound)


@_kind("glorot_normal")
def _gn(rng, shape, fi, fo):
    return math.sqrt(2.0 / (fi + fo)) * _normal(rng, shape)


@_kind("uniform_fan_in")
def _ufi(rng, shape, fi, fo):
    bound = 1.0 / math.sqrt(fi)
    return _uniform(rng, shape, -bound, bound)


@_kind("variance_scaling", scale=1.0, mode="fan_in", distribution="truncated_normal")
def _vs(rng, shape, fi, fo, scale, mode, distribution):
    fan = {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]
    var = scale / max(1.0, fan)
    if distribution == "truncated_normal":
        std = math.sqrt(var) / 0.87962566103423978
        return _truncated(rng, shape, 0.0, std, -2 * std, 2 * std)
    if distribution == "untruncated_normal":
        return math.sqrt(var) * _normal(rng, shape)
    bound = math.sqrt(3.0 * var)
    return _uniform(rng, shape, -bound, bound)


_CHOICES = {
    "mode": {"fan_in", "fan_out", "fan_avg"},
    "nonlinearity": {"relu", "leaky_relu", "linear", "sigmoid", "tanh"},
    "distribution": {"truncated_normal", "untruncated_normal", "uniform"},
}


def check_initializer(value: Any) -> dict:
    """Validates an initializer description; returns it as a full dict.

    Raises:
        SpecError: unknown kind, unknown or missing argument, wrong type.
    """
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict) or "kind" not in value:
        raise SpecError(f"an initializer is a kind name or an object with 'kind', got {value!r}")
    kind = value["kind"]
    if kind not in _KINDS:
        raise SpecError(f"unknown initializer '{kind}' (known: {', '.join(sorted(_KINDS))})")
    defaults, _ = _KINDS[kind]
    out = {"kind": kind}
    for key, v in value.items():
        if key == "kind":
            continue
        if key not in defaults:
            raise SpecError(f"initializer {kind} has no argument '{key}' (known: {', '.join(defaults) or 'none'})")
        if key in _CHOICES:
            if v not in _CHOICES[key]:
                raise SpecError(f"initializer {kind} argument '{key}' must be one of {sorted(_CHOICES[key])}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"initializer {kind} argument '{key}' must be a number, got {v!r}")
        out[key] = v
    for key, d in defaults.items():
        if key not in out:
            if d is None and not (kind == "truncated_normal" and key in ("a", "b")):
                raise SpecError(f"initializer {kind} needs argument '{key}'")
            out[key] = d
    return out


def stream(seed: int, name: str) -> np.random.Generator:
    """The random stream of one parameter."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def draw(init: dict, shape, fan_in: int, fan_out: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one parameter's values (float64) from a checked initializer."""
    defaults, fn = _KINDS[init["kind"]]
    kwargs = {k: init[k] for k in defaults}
    return fn(rng, tuple(shape), fan_in, fan_out, **kwargs)


def init_weights(ir, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical float32 weights of an IR from its initializers."""
    return {
        p.name: draw(p.init, p.shape, p.fan_in, p.fan_out, stream(seed, p.name)).astype(np.float32)
        for p in ir.params.values()
    }


def _branch_end_batchnorms(ir) -> set[str]:
    """BN nodes that end a residual branch (feed an add through shape-free ops), all but one per add."""
    ends: set[str] = set()
    for n in ir.nodes:
        if n.op != "add":
            continue
        sources = []
        for s in n.inputs:
            src = ir.node(s)
            while src.op in ("drop_path", "scale", "identity", "dropout"):
                src = ir.node(src.inputs[0])
            sources.append(src)
        bns = [s.name for s in sources if s.op == "batchnorm"]
        ends.update(bns[:-1] if len(bns) == len(sources) else bns)
    return ends


def _output_layers(ir) -> set[str]:
    """The conv/linear nodes that produce each output (through reshapes and dropout)."""
    found = set()
    for out in ir.outputs:
        node = ir.node(out.node)
        while node.op not in ("conv2d", "linear") and node.inputs:
            node = ir.node(node.inputs[0])
        found.add(node.name)
    return found


def probe_weights(ir, seed: int = 0, batch: np.ndarray | None = None, batch_size: int = 16,
                  output_std: float = 1.0) -> dict[str, np.ndarray]:
    """Weights for conformance tests: every parameter random, activations near unit scale.

    Defaults such as zero biases or unit BN statistics would hide a backend that drops a bias
    or swaps mean and variance, and a spec's own initializers give logits anywhere from 1e-10
    to 1e11, where any tolerance means nothing. So the probe is calibrated on a batch:

    * conv and linear weights are drawn, biases U(-0.1, 0.1), then both are rescaled so that
      the layer's output has unit standard deviation (LSUV); the layers that produce the
      outputs get ``output_std``;
    * BN running statistics are set near the calibration batch's, with jitter; gamma is
      U(0.8, 1.2), but U(0.1, 0.3) on BNs that end a residual branch (blocks stay near the
      identity), and beta is U(0.5, 1.0): most ReLUs are active, some are not. Random ReLU
      networks at unit gain are chaotic and amplify fp32 rounding by about 1.3x per block
      (ResNet-152 logits then differ from float64 by 1e-3); these two choices keep the
      amplification small without hiding any op.

    Args:
        ir: The network.
        seed: Seed of every draw (weights and calibration batch).
        batch: Calibration input (N, C, H, W); by default ``batch_size`` seeded normal images
            of the IR's input shape (16: late feature maps may be 1x1, and BN statistics
            need samples).
        batch_size: Size of the default calibration batch.
        output_std: Target standard deviation of the outputs.
    """
    from .reference import iterate

    w = init_weights(ir, seed)
    rngs = {name: stream(seed + 1, name) for name in w}
    for name, p in ir.params.items():
        if name.endswith(".bias"):
            w[name] = _uniform(rngs[name], p.shape, -0.1, 0.1).astype(np.float32)
    if batch is None:
        batch = _normal(stream(seed, "probe.input"), (batch_size, *ir.input_shape))
    params = {k: v.astype(np.float64) for k, v in w.items()}
    branch_ends = _branch_end_batchnorms(ir)
    outputs = _output_layers(ir)

    def adjust(node, inputs, out):
        if node.op in ("conv2d", "linear"):
            target = output_std if node.name in outputs else 1.0
            factor = target / (float(out.std()) or 1.0)
            for local in ("weight", "bias"):
                if f"{node.name}.{local}" in params:
                    params[f"{node.name}.{local}"] = params[f"{node.name}.{local}"] * factor
            return None  # run again with the rescaled weights
        if node.op == "batchnorm":
            axes = (0,) if out.ndim == 2 else (0, 2, 3)
            x = inputs[0]
            mean, var = x.mean(axis=axes), x.var(axis=axes) + 1e-3
            rng = rngs[node.name + ".running_mean"]
            params[node.name + ".running_mean"] = mean + 0.1 * np.sqrt(var) * _uniform(rng, mean.shape, -1, 1)
            params[node.name + ".running_var"] = var * _uniform(rng, var.shape, 0.8, 1.25)
            gamma = (0.1, 0.3) if node.name in branch_ends else (0.8, 1.2)
            if node.name + ".weight" in params:
                params[node.name + ".weight"] = _uniform(rng, mean.shape, *gamma)
            if node.name + ".bias" in params:
                params[node.name + ".bias"] = _uniform(rng, mean.shape, 0.5, 1.0)
            return None
        return out

    for _ in iterate(ir, params, batch, hook=adjust):
        pass
    return {k: v.astype(np.float32) for k, v in params.items()}


def save_weights(path: str | Path, weights: dict[str, np.ndarray]) -> Path:
    """Writes a weights file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()})
    tmp.replace(path)
    return path


def load_weights(path: str | Path, ir=None) -> dict[str, np.ndarray]:
    """Reads a weights file (no pickles); checks names and shapes against ``ir`` if given."""
    with np.load(path, allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    if ir is not None:
        missing = sorted(set(ir.params) - set(weights))
        extra = sorted(set(weights) - set(ir.params))
        if missing or extra:
            raise SpecError(f"weights do not fit {ir.name}: missing {missing[:3]}, unexpected {extra[:3]}", file=str(path))
        for name, p in ir.params.items():
            if tuple(weights[name].shape) != tuple(p.shape):
                raise SpecError(f"{name} has shape {weights[name].shape}, expected {p.shape}", file=str(path))
    return weights
