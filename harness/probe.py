"""Calibrated probe weights: what the conformance tests run every network with.

The ops are found by their traits (samenet.ops.TRAITS): ``weighted`` layers are rescaled,
``normaliser`` statistics set, ``residual_sum`` branches damped through ``passthrough`` ops.
"""

from __future__ import annotations

import numpy as np

from .init import _normal, _uniform, init_weights, stream
from .ops import ops_with
from .reference import iterate


def _branch_end_batchnorms(ir) -> set[str]:
    """BN nodes that end a residual branch (feed an add through shape-free ops), all but one per add."""
    passthrough, sums, normalisers = ops_with("passthrough"), ops_with("residual_sum"), ops_with("normaliser")
    ends: set[str] = set()
    for n in ir.nodes:
        if n.op not in sums:
            continue
        sources = []
        for s in n.inputs:
            src = ir.node(s)
            while src.op in passthrough:
                src = ir.node(src.inputs[0])
            sources.append(src)
        bns = [s.name for s in sources if s.op in normalisers]
        ends.update(bns[:-1] if len(bns) == len(sources) else bns)
    return ends


def _output_layers(ir) -> set[str]:
    """The weighted (conv, linear) nodes that produce each output (through reshapes and dropout)."""
    weighted = ops_with("weighted")
    found = set()
    for out in ir.outputs:
        node = ir.node(out.node)
        while node.op not in weighted and node.inputs:
            node = ir.node(node.inputs[0])
        found.add(node.name)
    return found


def probe_weights(ir, seed: int = 0, batch: np.ndarray | None = None, batch_size: int = 16,
                  output_std: float = 1.0) -> dict[str, np.ndarray]:
    """Weights for conformance tests: every parameter random, activations near unit scale.

    Defaults such as zero biases or unit BN statistics would hide a backend that drops a bias
    or swaps mean and variance, and a spec's own initializers give logits anywhere from 1e-10
    to 1e11, where any tolerance means nothing. So the probe is calibrated on a batch:

    * weighted (conv and linear) layers' weights are drawn, biases U(-0.1, 0.1), then both are rescaled so that
      the layer's output has unit standard deviation (LSUV); the layers that produce the
      outputs get ``output_std``;
    * normalisers' (BN) running statistics are set near the calibration batch's, with jitter; gamma is
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
    weighted, normalisers = ops_with("weighted"), ops_with("normaliser")

    def adjust(node, inputs, out):
        if node.op in weighted:
            target = output_std if node.name in outputs else 1.0
            factor = target / (float(out.std()) or 1.0)
            for local in ("weight", "bias"):
                if f"{node.name}.{local}" in params:
                    params[f"{node.name}.{local}"] = params[f"{node.name}.{local}"] * factor
            return None  # run again with the rescaled weights
        if node.op in normalisers:
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
