"""Backends: one module per framework, all implementing harness.backend.Backend.

Registration is one line per backend below (``name: "module:Class"``); removing a backend is
deleting its module, its tox env and its line here. Importing this package imports no
framework: each backend module imports its framework lazily, inside its methods.
"""

REGISTRY = {
    "numpy": "backends.numpy_backend:NumpyBackend",
    "torch": "backends.torch_backend:TorchBackend",
    "tf": "backends.keras_backend:KerasTFBackend",
    "keras-torch": "backends.keras_torch_backend:KerasTorchBackend",
    "keras-jax": "backends.keras_jax_backend:KerasJaxBackend",
    "mxnet": "backends.mxnet_backend:MXNetBackend",
    "paddle": "backends.paddle_backend:PaddleBackend",
    "mindspore": "backends.mindspore_backend:MindSporeBackend",
}
