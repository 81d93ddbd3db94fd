"""MindSpore 2.x backend: metadata (imports no framework).

The implementation is ``samenet.backends.mindspore.impl`` (the backend: devices, build, steps; its
docstring is the design note), ``samenet.backends.mindspore.net`` (the Cell that runs the IR's
schedule, and the straight-line program graph mode compiles), ``samenet.backends.mindspore.cells``
(the op Cells) and ``samenet.backends.mindspore.builders`` (the builder table).
"""

from samenet.backend import BackendInfo, Capabilities, DataParallel
from samenet.distributed import Helper

TUNED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
"""MindSpore 2.10 runs CPU convolutions in plain NCHW; on AVX-512 CPUs oneDNN then picks
``jit_uni_ncsp:conv+ref:any``, a reference kernel about 70x slower than its AVX2 im2col+GEMM
(measured: 64->64 3x3 conv on 16x64x56x56, 25 s vs 0.33 s). Capping oneDNN's ISA at AVX2
restores the GEMM kernels; a no-op on CPUs without AVX-512."""

_SCHED_HELPER = """
import subprocess, sys, time
from samenet.lifetime import die_with_parent
# MindSpore's scheduler ends its own process (from C++) once every worker has unregistered, which
# is a moment before the ranks exit, and a helper that ends before the ranks is a failure: so it
# runs as a child in this session (the launcher's group kill ends both; a dead helper, too) and
# this process waits.
code = subprocess.call([sys.executable, "-c", "import mindspore as ms; ms.set_device('CPU'); "
                        "from mindspore.communication import init; init()"], preexec_fn=die_with_parent())
if code:
    sys.exit(code)
while True:
    time.sleep(3600)
"""


class MindSporeInfo(BackendInfo):
    """MindSpore 2.10, ``pynative`` (the default) or ``graph`` (ms.jit; the first step compiles).

    ``bn_variance`` is "unbiased": the ops.BatchNorm primitive updates the running variance
    with the unbiased batch variance (measured). No float64 build: MindSpore's BatchNorm has
    float16/float32 kernels only. Devices: the CPU, and GPU/Ascend where the installed
    MindSpore build supports them (build() checks); tf32 is CUDA-only (build() refuses it
    elsewhere). No amp (docs/backends/mindspore.md): ms.amp.auto_mixed_precision("O1")
    rewrites a network by parsing its Cells' source and returns a new one; the old module
    discarded that and failed it anyway (OSError on every zoo model), and the ops a
    schedule-driven construct calls are invisible to the rewrite.
    """

    name = "mindspore"
    framework = "mindspore"
    distributions = ("mindspore",)
    pins = ("mindspore==2.10.0", "numpy<2")
    impl = "samenet.backends.mindspore.impl:MindSporeBackend"
    builders = "samenet.backends.mindspore.builders"
    exec_modes = ("pynative", "graph")
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=False, data_parallel=True,
                                devices=("cpu", "cuda", "ascend"), precisions=("fp32", "tf32"))
    known_gaps: dict[str, str] = {
        "train:inception_v3_keras": (
            "float32 rounding that numpy's float32 estimate undershoots, unprovable here: two steps miss by 97x "
            "the tolerance and 1.9e-5 in the step-2 loss (numpy float32: 26x); TF (22x, loss 1.7e-5) and Paddle "
            "(549x) miss too and their float64 builds match the oracle, but MindSpore's BatchNorm has no "
            "float64 kernel (float16/float32 only), so no float64 build proves it"),
    }
    bn_variance = "unbiased"
    data_parallel = DataParallel(
        engine="ParallelMode.DATA_PARALLEL (gradients_mean=True): nn.TrainOneStepCell's DistributedGradReducer",
        transports={"cpu": "mccl", "cuda": "nccl"},
        launcher="MindSpore dynamic cluster as msrun sets it (MS_ROLE, MS_SCHED_HOST/PORT, MS_WORKER_NUM, "
                 "MS_NODE_ID), scheduler as a helper process on 127.0.0.1:<port>, mindspore.communication.init",
        bn="local", ports=1)
    """On the CPU ``init()`` picks mccl, MindSpore's own TCP collective library (MsCollectiveCommLib;
    this build links no gloo). The grad reducer all-reduces the trainable gradients only; BN running
    statistics are Parameters that never enter it, so each rank keeps its own: ``local``."""

    @staticmethod
    def _cluster_env(role: str, world: int, host: str, ports) -> dict[str, str]:
        return {"MS_ROLE": role, "MS_SCHED_HOST": host, "MS_SCHED_PORT": str(ports[0]), "MS_WORKER_NUM": str(world)}

    def dp_env(self, rendezvous) -> dict[str, str]:
        """What msrun sets for a worker (read by mindspore.communication.init)."""
        return self._cluster_env("MS_WORKER", rendezvous.world, rendezvous.coordinator, rendezvous.ports) | {
            "MS_NODE_ID": str(rendezvous.rank)}

    def dp_helpers(self, world: int, host: str, ports) -> list:
        return [Helper("scheduler", ["-c", _SCHED_HELPER], self._cluster_env("MS_SCHED", world, host, ports))]

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """GLOG_v=3 (errors only; MindSpore's default 2 prints warnings), and when tuned the
        thread variables and TUNED_ENV."""
        env = {"GLOG_v": "3"}
        if tuned:
            env.update(super().env_vars(threads, tuned), **TUNED_ENV)
        return env


INFO = MindSporeInfo()
