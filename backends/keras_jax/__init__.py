"""Keras 3 on JAX as a backend: metadata (imports no framework).

The implementation (backends/keras_jax/impl.py) runs the shared Keras model (backends/keras)
on Keras' JAX backend, its steps compiled by jax.jit through ``Model.stateless_call``.
"""

from samenet.backends.keras import KerasInfo
from samenet.backend import Capabilities, DataParallel


class KerasJaxInfo(KerasInfo):
    name = "keras-jax"
    keras_backend = "jax"
    pins = ("jax[cpu]==0.10.2", "keras==3.15.1")
    impl = "samenet.backends.keras_jax.impl:KerasJaxBackend"
    exec_modes = ("jit", "eager")
    # No float64 build: JAX computes float64 only with x64 enabled before any array exists.
    capabilities = Capabilities(train=True, infer=True, masks=True, set_lr=True, fp64=False, data_parallel=True,
                                devices=("cpu", "cuda"), precisions=("fp32", "amp-bf16"))
    known_gaps: dict[str, str] = {}
    # One SPMD program over the global devices (jax.distributed + Keras' DataParallel): the
    # batch statistics of BatchNorm are the global batch's, all-reduced by XLA ("sync").
    data_parallel = DataParallel(engine="keras.distribution.DataParallel over jax.distributed (one jax.jit SPMD "
                                        "step, gradients all-reduced by XLA)",
                                 transports={"cpu": "gloo", "cuda": "nccl"},
                                 launcher="a process per rank, jax.distributed.initialize with its coordinator "
                                          "on 127.0.0.1",
                                 bn="sync", ports=1)

    def dp_env(self, rendezvous) -> dict[str, str]:
        """The rank, for configure (it pins rank r to its own CPUs, and must not start the JAX
        client before jax.distributed.initialize); JAX's own coordinator variable."""
        return {"SAMENET_JAX_LOCAL_RANK": str(rendezvous.local),
                "JAX_COORDINATOR_ADDRESS": f"{rendezvous.coordinator}:{rendezvous.ports[0]}"}


INFO = KerasJaxInfo()
