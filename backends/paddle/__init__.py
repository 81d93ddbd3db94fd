"""The PaddlePaddle backend: metadata (imports no framework).

The implementation is samenet.backends.paddle.impl (the backend and its graph layer), with the op
layers in samenet.backends.paddle.layers and the builder table in samenet.backends.paddle.builders.
"""

from __future__ import annotations


from samenet.backend import BackendInfo, Capabilities, DataParallel


class PaddleInfo(BackendInfo):
    """PaddlePaddle: dynamic graph by default; ``static`` = paddle.jit.to_static (conversion in
    the first step)."""

    name = "paddle"
    framework = "paddle"
    distributions = ("paddlepaddle", "paddlepaddle-gpu", "paddlepaddle-cpu")
    pins = ("paddlepaddle==3.3.1",)
    impl = "samenet.backends.paddle.impl:PaddleBackend"
    builders = "samenet.backends.paddle.builders"
    exec_modes = ("dynamic", "static")
    options: dict[str, tuple[str, ...]] = {}
    # tf32 and amp-* are CUDA-only (build() refuses them on the CPU: Paddle's CPU bf16
    # autocast is a silent no-op); fp64 is the verification build, on either device.
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=True,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16", "amp-fp16"))
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"  # Paddle updates the running variance with the biased batch variance
    # paddle.DataParallel all-reduces the trainable gradients (mean over ranks, measured) and
    # broadcasts parameters and buffers from rank 0 once, at construction; BN running
    # statistics are never synchronised afterwards: each rank keeps its own ("local").
    data_parallel = DataParallel(engine="paddle.DataParallel",
                                 transports={"cpu": "gloo", "cuda": "nccl"},
                                 launcher="a process per rank, Paddle's TCPStore on 127.0.0.1 (PADDLE_MASTER), "
                                          "paddle.distributed.init_parallel_env",
                                 bn="local", ports=1)

    def dp_env(self, rendezvous) -> dict[str, str]:
        """What paddle.distributed.launch sets per rank (read by init_parallel_env and
        ParallelEnv); the gloo pairs bind to the loopback interface."""
        master, port = rendezvous.coordinator, rendezvous.ports[0]
        # ParallelEnv needs one endpoint per rank; with the process-group path only the
        # store (PADDLE_MASTER, rank 0) listens on a fixed port, the others are labels.
        endpoints = [f"{rendezvous.address(r)}:{port + r}" for r in range(rendezvous.world)]
        kind = rendezvous.device.split(":")[0]
        env = {"PADDLE_TRAINER_ID": str(rendezvous.rank), "PADDLE_TRAINERS_NUM": str(rendezvous.world),
               "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints), "PADDLE_CURRENT_ENDPOINT": endpoints[rendezvous.rank],
               "PADDLE_MASTER": f"{master}:{port}", "MASTER_ADDR": master, "MASTER_PORT": str(port),
               "PADDLE_DISTRI_BACKEND": "nccl" if kind == "cuda" else "gloo",
               "PADDLE_LOCAL_RANK": str(rendezvous.local)}
        if rendezvous.loopback:
            env["GLOO_SOCKET_IFNAME"] = "lo"
        if kind == "cuda":
            env["FLAGS_selected_gpus"] = str(rendezvous.local)
        return env

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """Tuned: the core budget for OpenMP/MKL and oneDNN on (Paddle's FLAGS_use_onednn, and
        FLAGS_use_mkldnn, its name before 3.x); stock: Paddle's defaults (nothing set)."""
        if not tuned:
            return {}
        return {**super().env_vars(threads, tuned), "FLAGS_use_onednn": "1", "FLAGS_use_mkldnn": "1"}


INFO = PaddleInfo()
