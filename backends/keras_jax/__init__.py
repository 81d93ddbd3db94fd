"""Keras 3 on JAX as a backend: metadata (imports no framework).

The implementation (backends/keras_jax/impl.py) runs the shared Keras model (backends/keras)
on Keras' JAX backend, its steps compiled by jax.jit through ``Model.stateless_call``.
"""

from backends.keras import KerasInfo
from harness.backend import Capabilities


class KerasJaxInfo(KerasInfo):
    name = "keras-jax"
    keras_backend = "jax"
    pins = ("jax[cpu]==0.10.2", "keras==3.15.1")
    impl = "backends.keras_jax.impl:KerasJaxBackend"
    exec_modes = ("jit", "eager")
    # No float64 build: JAX computes float64 only with x64 enabled before any array exists.
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=False, data_parallel=False,
                                devices=("cpu", "cuda"), precisions=("fp32", "amp-bf16"))
    known_gaps: dict[str, str] = {"dp:*": (
        "not built yet: Keras' keras.distribution.DataParallel across processes needs "
        'jax.distributed.initialize with CPU collectives (gloo), untried on this CPU (issue 24 notes)')}


INFO = KerasJaxInfo()
