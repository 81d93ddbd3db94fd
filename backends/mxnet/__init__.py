"""Apache MXNet 1.9 (Gluon) backend: metadata (imports no framework).

The implementation is ``backends.mxnet.impl`` (the backend), ``backends.mxnet.graph`` (the
program and the HybridBlock that runs it) and ``backends.mxnet.builders`` (the builder table);
docs/backends/mxnet.md has the design notes.
"""

from harness.backend import BackendInfo, Capabilities


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
    impl = "backends.mxnet.impl:MXNetBackend"
    builders = "backends.mxnet.builders"
    exec_modes = ("imperative", "hybridized")
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=False,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32"))
    """tf32 is GPU-only (build refuses it on the CPU); amp is not implemented."""
    known_gaps: dict[str, str] = {}
    bn_variance = "biased"

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
