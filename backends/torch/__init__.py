"""The PyTorch backend's metadata (imports no framework; the implementation is ``impl``)."""

from samenet.backend import BackendInfo, Capabilities, DataParallel


class TorchInfo(BackendInfo):
    """PyTorch: eager or torch.compile, CPU or CUDA, float64 verification builds.

    tf32 (CUDA only) and amp-fp16 (a GPU mode) are declared because a CUDA build supports
    them; a CPU build refuses them in ``build``.
    """

    name = "torch"
    framework = "torch"
    distributions = ("torch",)
    pins = ("torch==2.13.0",)
    impl = "samenet.backends.torch.impl:TorchBackend"
    builders = "samenet.backends.torch.builders"
    exec_modes = ("eager", "compile")
    options = {"memory_format": ("contiguous", "channels_last"), "dp_bn": ("broadcast", "sync")}
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=True,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16", "amp-fp16"))
    known_gaps: dict[str, str] = {}
    bn_variance = "unbiased"
    data_parallel = DataParallel(engine="torch.nn.parallel.DistributedDataParallel",
                                 transports={"cpu": "gloo", "cuda": "nccl"},
                                 launcher="a process per rank, TCP rendezvous on 127.0.0.1 (init_method tcp://)",
                                 bn="broadcast", ports=1,
                                 # In the interpreter's exit a Gloo worker thread may still be
                                 # freeing the last barrier's work, whose tensors need the GIL:
                                 # std::terminate, SIGABRT (seen under load in CI, 5 in 6 here).
                                 rank_exit="immediate")

    def dp_env(self, rendezvous) -> dict[str, str]:
        # Gloo binds to the interface its host name resolves to unless told: loopback only on
        # one host; across hosts, the interface of the host's name (or the user's GLOO_SOCKET_IFNAME).
        return {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo"} if rendezvous.loopback else {}


INFO = TorchInfo()
