"""TensorFlow / Keras 3 as a backend: metadata (imports no framework).

The implementation (backends/tf/impl.py) runs the shared Keras model (backends/keras) on
TensorFlow with a few TF-kernel layers (backends/tf/layers.py) and TF step functions.
"""

import json

from samenet.backends.keras import BUILDERS_MODULE, LAYOUT_OPTION
from samenet.backend import BackendInfo, Capabilities, DataParallel
from samenet.errors import UsageError

DP_MAX_WORKERS = 8
"""Ranks a data-parallel group may have: MWMS needs a gRPC port per worker, and the harness
hands a backend a fixed number of ports (DataParallel.ports)."""


class TFInfo(BackendInfo):
    name = "tf"
    framework = "tensorflow"
    distributions = ("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tensorflow-macos", "tf-nightly",
                     "tf-nightly-cpu")
    pins = ("tensorflow-cpu==2.21.0", "keras==3.15.1")
    impl = "samenet.backends.tf.impl:KerasTFBackend"
    builders = BUILDERS_MODULE
    exec_modes = ("graph", "xla", "eager")
    options = LAYOUT_OPTION
    # tf32 and amp-fp16 are GPU modes: build() refuses them on the CPU.
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=True,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16", "amp-fp16"))
    known_gaps: dict[str, str] = {}
    bn_variance = "unbiased"  # TF's fused BN kernel updates with the unbiased variance (impl's docs)
    # The custom loop all-reduces the gradients (MEAN) in the replica context; BN moving
    # statistics are MirroredVariables with aggregation NONE, whose replica-context assign
    # updates the local copy only, so each rank keeps its own ("local", the tier proves it).
    data_parallel = DataParallel(engine="tf.distribute.MultiWorkerMirroredStrategy (custom loop)",
                                 transports={"cpu": "ring", "cuda": "nccl"},
                                 launcher="a process per rank, TF_CONFIG cluster of gRPC workers on 127.0.0.1",
                                 bn="local", ports=DP_MAX_WORKERS)

    def dp_env(self, rendezvous) -> dict[str, str]:
        """TF_CONFIG of rank ``rendezvous.rank`` (one gRPC worker a port); on CUDA a rank sees
        only its own GPU, as MWMS replicates over every visible device."""
        world, ports = rendezvous.world, rendezvous.ports
        if world > len(ports):
            raise UsageError(f"tf backend: data parallel over at most {len(ports)} workers (asked {world})")
        tf_config = {"cluster": {"worker": [f"{rendezvous.address(r)}:{ports[r]}" for r in range(world)]},
                     "task": {"type": "worker", "index": rendezvous.rank}}
        env = {"TF_CONFIG": json.dumps(tf_config)}
        kind, _, index = rendezvous.device.partition(":")
        if kind in ("cuda", "gpu"):
            env["CUDA_VISIBLE_DEVICES"] = index or str(rendezvous.local)
        return env

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """Quiet logs and Keras on TF always; tuned: Intel/TF CPU guidance for the budget.

        TF's x86 wheels use oneDNN on an Eigen thread pool: TF_ENABLE_ONEDNN_OPTS=1 (the
        default on Linux x86 since 2.9, made explicit), intra-op threads = the core budget,
        inter-op threads = 1 (one socket: independent ops would only compete for the same
        cores). The OpenMP variables cover oneDNN builds that use OpenMP.
        """
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
        if tuned:
            n = str(threads)
            env.update(super().env_vars(threads, tuned))
            env.update({"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": n,
                        "TF_NUM_INTEROP_THREADS": str(INTER_OP_THREADS)})
        return env


INTER_OP_THREADS = 1
"""TF inter-op threads for a tuned run (one socket; env_vars and the impl's configure)."""

INFO = TFInfo()
