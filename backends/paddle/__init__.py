"""The PaddlePaddle backend: metadata (imports no framework).

The implementation is backends.paddle.impl (the backend and its graph layer), with the op
layers in backends.paddle.layers and the builder table in backends.paddle.builders.
"""

from __future__ import annotations

from harness.backend import BackendInfo, Capabilities


class PaddleInfo(BackendInfo):
    """PaddlePaddle: dynamic graph by default; ``static`` = paddle.jit.to_static (conversion in
    the first step)."""

    name = "paddle"
    framework = "paddle"
    distributions = ("paddlepaddle", "paddlepaddle-gpu", "paddlepaddle-cpu")
    pins = ("paddlepaddle==3.3.1",)
    impl = "backends.paddle.impl:PaddleBackend"
    builders = "backends.paddle.builders"
    exec_modes = ("dynamic", "static")
    options: dict[str, tuple[str, ...]] = {}
    # tf32 and amp-* are CUDA-only (build() refuses them on the CPU: Paddle's CPU bf16
    # autocast is a silent no-op); fp64 is the verification build, on either device.
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=False,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16", "amp-fp16"))
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"  # Paddle updates the running variance with the biased batch variance

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """Tuned: the core budget for OpenMP/MKL and oneDNN on (Paddle's FLAGS_use_onednn, and
        FLAGS_use_mkldnn, its name before 3.x); stock: Paddle's defaults (nothing set)."""
        if not tuned:
            return {}
        return {**super().env_vars(threads, tuned), "FLAGS_use_onednn": "1", "FLAGS_use_mkldnn": "1"}


INFO = PaddleInfo()
