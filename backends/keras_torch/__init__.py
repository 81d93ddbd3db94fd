"""Keras 3 on PyTorch as a backend: metadata (imports no framework).

The implementation (backends/keras_torch/impl.py) runs the shared Keras model
(backends/keras) on Keras' torch backend, eagerly, with PyTorch's autograd and SGD.
"""

from samenet.backends.keras import KerasInfo
from samenet.backend import Capabilities


class KerasTorchInfo(KerasInfo):
    name = "keras-torch"
    keras_backend = "torch"
    pins = ("torch==2.13.0", "keras==3.15.1")
    impl = "samenet.backends.keras_torch.impl:KerasTorchBackend"
    exec_modes = ("eager",)
    # tf32: CUDA only (refused on the CPU inside build); no amp-fp16 (it needs loss scaling).
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=True, data_parallel=False,
                                devices=("cpu", "cuda"), precisions=("fp32", "tf32", "amp-bf16"))
    known_gaps: dict[str, str] = {"dp:*": (
        'Keras 3.15 has no distribution backend for torch (keras/src/backend ships distribution_lib for '
        "jax and tensorflow only); wrapping the Keras model in torch DDP would measure torch's engine, "
        "not Keras's")}


INFO = KerasTorchInfo()
