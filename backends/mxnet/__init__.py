"""Apache MXNet 1.9 (Gluon) backend: metadata (imports no framework).

The implementation is ``samenet.backends.mxnet.impl`` (the backend), ``samenet.backends.mxnet.graph`` (the
program and the HybridBlock that runs it) and ``samenet.backends.mxnet.builders`` (the builder table);
docs/backends/mxnet.md has the design notes.
"""

from samenet.backend import BackendInfo, Capabilities, DataParallel
from samenet.distributed import Helper, is_loopback

_PS_HELPER = """
import sys, time
try:
    import mxnet  # DMLC_ROLE=scheduler|server: the import runs ps-lite's node, then sys.exit()
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
    # The node ends when the workers finalize, which precedes the ranks' own exit: wait to be
    # ended by the launcher (a helper that ends before the ranks is a failure).
    while True:
        time.sleep(3600)
"""


class MXNetInfo(BackendInfo):
    """MXNet 1.9.1 (its last release; retired upstream), ``imperative`` or ``hybridized``.

    ``bn_variance`` is "biased": MXNet's own BatchNorm kernels (CPU, and GPU without cuDNN)
    update the running variance with the biased batch variance; cuDNN's BatchNorm uses the
    unbiased one (apache/mxnet#21111), which a class attribute cannot say (docs/backends/mxnet.md).
    """

    name = "mxnet"
    framework = "mxnet"
    distributions = ("mxnet", "mxnet-cu112", "mxnet-cu117", "mxnet-cu110", "mxnet-cu102")
    """The CPU wheel, then 1.9.1's CUDA wheels (tox.ini's SAMENET_MXNET_DEPS names one)."""
    pins = ("mxnet==1.9.1", "numpy<1.24")
    impl = "samenet.backends.mxnet.impl:MXNetBackend"
    builders = "samenet.backends.mxnet.builders"
    exec_modes = ("imperative", "hybridized")
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=True,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32"))
    """tf32 is GPU-only (build refuses it on the CPU); amp is not implemented."""
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"
    data_parallel = DataParallel(
        engine="mxnet.kvstore dist_sync (ps-lite parameter server) + gluon.Trainer(update_on_kvstore=False)",
        transports={"cpu": "ps-lite (ZeroMQ TCP)", "cuda": "ps-lite (ZeroMQ TCP)"},
        launcher="ps-lite scheduler + 1 server as helper processes, scheduler on 127.0.0.1:<port>, "
                 "ranks as DMLC_ROLE=worker",
        bn="local", ports=1)
    """Gradients are summed by the server (sync mode) and pulled by every worker; each worker then
    runs MXNet's SGD locally on sum/world (Trainer.step(world)). BN running statistics are aux
    states updated in each worker's backward and never pushed: ``local``."""

    @staticmethod
    def _ps_env(role: str, world: int, scheduler: str, ports, own: str) -> dict[str, str]:
        env = {"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": scheduler, "DMLC_PS_ROOT_PORT": str(ports[0]),
               "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": str(world), "DMLC_NODE_HOST": own}
        if is_loopback(own) and is_loopback(scheduler):
            env["DMLC_INTERFACE"] = "lo"
        return env

    def dp_env(self, rendezvous) -> dict[str, str]:
        return self._ps_env("worker", rendezvous.world, rendezvous.coordinator, rendezvous.ports, rendezvous.host)

    def dp_helpers(self, world: int, host: str, ports) -> list:
        """The scheduler and the one server, on rank 0's host (``host``)."""
        return [Helper(role, ["-c", _PS_HELPER], self._ps_env(role.split()[0], world, host, ports, host))
                for role in ("scheduler", "server 0")]

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        """MXNet's CPU best practice (docs/faq/perf.md, docs/faq/env_var.md) for ``threads`` cores.

        OMP_NUM_THREADS sets the operators' OpenMP threads (MXNet's own default is half the
        cores); MXNET_CPU_WORKER_NTHREADS=1 (its default, stated for the record) keeps one
        engine worker, so operators run one after another, each on every core;
        MXNET_MKLDNN_ENABLED=1 keeps oneDNN on (the pip build's default, stated for the
        record). The docs' KMP_AFFINITY is left out: the pip wheel links GNU OpenMP, which
        ignores it. MXNET_SUBGRAPH_BACKEND stays unset: its fusions fold BN into convs for
        inference only, which would make train and infer cells different programs.
        """
        if not tuned:
            return {}
        return {**super().env_vars(threads, tuned), "MXNET_CPU_WORKER_NTHREADS": "1", "MXNET_MKLDNN_ENABLED": "1"}


INFO = MXNetInfo()
