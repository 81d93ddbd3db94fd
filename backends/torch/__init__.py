"""The PyTorch backend's metadata (imports no framework; the implementation is ``impl``)."""

from harness.backend import BackendInfo, Capabilities


class TorchInfo(BackendInfo):
    """PyTorch: eager or torch.compile, CPU or CUDA, float64 verification builds.

    tf32 (CUDA only) and amp-fp16 (a GPU mode) are declared because a CUDA build supports
    them; a CPU build refuses them in ``build``.
    """

    name = "torch"
    framework = "torch"
    distributions = ("torch",)
    pins = ("torch==2.13.0",)
    impl = "backends.torch.impl:TorchBackend"
    builders = "backends.torch.builders"
    exec_modes = ("eager", "compile")
    options = {"memory_format": ("contiguous", "channels_last")}
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=False,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16", "amp-fp16"))
    known_gaps: dict[str, str] = {}
    bn_variance = "unbiased"


INFO = TorchInfo()
