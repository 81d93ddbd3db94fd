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
                  linear, sigmoid, tanh), fan from ``mode`` (fan_in or fan_out only: an
                  argument the kind would ignore is an error); PyTorch's default for conv
                  and linear weights is ``a = sqrt(5)``, i.e. U(-1/sqrt(fan_in), +)
kaiming_normal    N(0, g / sqrt(fan)), same arguments
glorot_uniform    U(-sqrt(6 / (fan_in + fan_out)), +) (Keras' default kernel initializer)
glorot_normal     N(0, sqrt(2 / (fan_in + fan_out)))
uniform_fan_in    U(-1/sqrt(fan_in), +): PyTorch's default conv and linear bias
variance_scaling  Keras: ``scale``, ``mode`` (fan_in, fan_out, fan_avg), ``distribution``
                  (truncated_normal with Keras' 0.8796 correction, untruncated_normal, uniform)
================  ==========================================================================

Fans follow PyTorch: conv fan_in = in_channels / groups * kh * kw, fan_out = out_channels * kh
* kw; a bias uses its weight's fans. Calibrated probe weights for the conformance tests are
samenet.probe's.
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
_KIND_CHOICES = {("kaiming_uniform", "mode"): {"fan_in", "fan_out"}, ("kaiming_normal", "mode"): {"fan_in", "fan_out"}}
"""Narrower choices of one kind's argument: PyTorch's kaiming initialisers have no fan_avg."""


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
    if not isinstance(kind, str) or kind not in _KINDS:
        raise SpecError(f"unknown initializer '{kind}' (known: {', '.join(sorted(_KINDS))})")
    defaults, _ = _KINDS[kind]
    out = {"kind": kind}
    for key, v in value.items():
        if key == "kind":
            continue
        if key not in defaults:
            raise SpecError(f"initializer {kind} has no argument '{key}' (known: {', '.join(defaults) or 'none'})")
        if key in _CHOICES:
            choices = _KIND_CHOICES.get((kind, key), _CHOICES[key])
            if not isinstance(v, str) or v not in choices:
                raise SpecError(f"initializer {kind} argument '{key}' must be one of {sorted(choices)}, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecError(f"initializer {kind} argument '{key}' must be a finite number, got {v!r}")
        out[key] = v
    if kind.startswith("kaiming_") and "a" in out and out.get("nonlinearity", defaults["nonlinearity"]) != "leaky_relu":
        raise SpecError(f"initializer {kind} argument 'a' applies to nonlinearity leaky_relu only, "
                        f"not {out['nonlinearity']}: drop it")
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
