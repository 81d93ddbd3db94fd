"""The numpy reference executor as a backend: metadata (imports no framework)."""

from samenet.backend import BackendInfo, Capabilities


class NumpyInfo(BackendInfo):
    name = "numpy"
    framework = "numpy"
    impl = "samenet.backends.numpy.impl:NumpyBackend"
    exec_modes = ("eager",)
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=False,
                                devices=("cpu",), precisions=("fp32",))
    reference = True


INFO = NumpyInfo()
