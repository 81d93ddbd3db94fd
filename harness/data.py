"""Data the harness makes for every backend: identical bytes, made before any timing."""

from __future__ import annotations

import numpy as np


def num_classes(ir) -> int:
    """Classes of the main output (its feature count)."""
    return int(np.prod(ir.output_shape))


def synthetic_batch(ir, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded batch: x ~ N(0, 1) float32 (N, C, H, W), labels int64 uniform over the classes."""
    rng = np.random.default_rng([seed, batch])
    x = rng.standard_normal((batch, *ir.input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes(ir), size=batch, dtype=np.int64)
    return x, y
