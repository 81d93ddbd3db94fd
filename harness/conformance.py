"""What the conformance suite runs, built without any framework.

Op cases come from the op table (each op's ``cases``, as ONNX's node tests); model cases from
the spec registry at each spec's test input. Each case carries its IR, calibrated probe
weights (harness.init.probe_weights), an input batch and the float64 reference outputs; a
backend's fp32 result must equal them within RTOL and ATOL.

Scale matters for a fixed ATOL: op cases run at unit scale. Model cases calibrate their
logits to a standard deviation of MODEL_OUTPUT_STD (0.1): fp32 rounding grows by about 1e-6
of the signal per layer, so over the 100-plus layers of an Inception-v4 it reaches 1e-4 of
the logits, and unit-scale logits would test fp32 rounding against ATOL instead of testing
that the networks are the same. At 0.1 the check still fails on any wiring, layout or
convention error (those change logits by 1e-3 of their scale or far more), while the
numerical noise stays several times under the tolerance.

Model cases are cached on disk (keyed by the IR's fingerprint) so that the five backend
envs compute each reference once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import init, reference, zoo
from .init import save_weights, stream
from .ir import IR, build_ir
from .ops import OPS

RTOL = 1e-4
ATOL = 1e-5
MODEL_OUTPUT_STD = 0.1
PROBE_VERSION = 2  # bump when probe_weights changes, to invalidate cached cases
CACHE_LIMIT_PARAMS = 30_000_000  # larger models are recomputed rather than cached (disk)


def cache_dir() -> Path:
    """``$SAMENET_CACHE``, else ``~/.cache/samenet``."""
    return Path(os.environ.get("SAMENET_CACHE") or Path.home() / ".cache" / "samenet")


@dataclass
class Case:
    """One conformance case."""

    id: str
    ir: IR
    weights: dict[str, np.ndarray]
    x: np.ndarray
    expected: list[np.ndarray]


def op_case_ids() -> list[tuple[str, str, dict]]:
    """(test id ``op:NAME/CASE``, op, case) for every case of every op."""
    out = []
    for name, op in OPS.items():
        for i, case in enumerate(op.cases):
            out.append((f"op:{name}/{case.get('id', i)}", name, case))
    return out


def op_case_ir(op: str, case: dict) -> IR:
    """A small IR that applies ``op`` to the case's input shapes.

    The first input is the model input; each further input is derived from it by a 1x1 conv
    (or a linear layer) to its channel count, then adaptive pooling to its spatial size.
    """
    shapes = [tuple(s) for s in case["inputs"]]
    layers, refs = [], ["input"]
    for i, shape in enumerate(shapes[1:], start=1):
        if len(shape) == 1:
            layers.append({"op": "linear", "name": f"in{i}", "inputs": ["input"], "out_features": shape[0]})
        else:
            layers.append({"op": "conv2d", "name": f"in{i}", "inputs": ["input"], "out_channels": shape[0], "kernel": 1})
            if shape[1:] != shapes[0][1:]:
                layers.append({"op": "adaptive_avgpool2d", "name": f"in{i}p", "output_size": list(shape[1:])})
        refs.append(layers[-1]["name"])
    node = {"op": op, "name": "op", **case["attrs"]}
    if len(shapes) > 1:
        node["inputs"] = refs
    layers.append(node)
    doc = {"name": f"{op}_case", "input": list(shapes[0]), "layers": layers}
    return build_ir(doc, f"op table case {op}")


def op_case(op: str, case: dict, seed: int = 0, batch: int = 2) -> Case:
    ir = op_case_ir(op, case)
    weights = init.probe_weights(ir, seed)
    x = init._normal(stream(seed, "op.input"), (batch, *ir.input_shape)) * case.get("scale", 1.0) + case.get("shift", 0.0)
    x = x.astype(np.float32)
    expected = reference.run(ir, weights, x).outputs
    return Case(f"op:{op}/{case.get('id', '')}", ir, weights, x, expected)


def model_case(model: str, seed: int = 0, batch: int = 2) -> Case:
    """The model at its test input with probe weights and its reference outputs (eval)."""
    ir = zoo.load_for_test(model)
    path = cache_dir() / "conformance" / f"{model}-{ir.fingerprint()}-s{seed}-b{batch}-v{PROBE_VERSION}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            weights = {k[2:]: f[k] for k in f.files if k.startswith("w:")}
            x = f["x"]
            expected = [f[f"out{i}"] for i in range(len([k for k in f.files if k.startswith("out")]))]
        return Case(f"model:{model}", ir, weights, x, expected)
    weights = init.probe_weights(ir, seed, output_std=MODEL_OUTPUT_STD)
    x = init._normal(stream(seed, "model.input"), (batch, *ir.input_shape)).astype(np.float32)
    expected = reference.run(ir, weights, x).outputs
    if ir.trainable_params + ir.non_trainable_params <= CACHE_LIMIT_PARAMS:
        arrays = {f"w:{k}": v for k, v in weights.items()}
        arrays.update(x=x, **{f"out{i}": o for i, o in enumerate(expected)})
        save_weights(path, arrays)
    return Case(f"model:{model}", ir, weights, x, expected)
