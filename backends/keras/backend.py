"""What the backends running Keras on another framework share (keras-torch, keras-jax).

KERAS_BACKEND must be set before this module is imported (see the package's docs).
"""

from __future__ import annotations

import gc
import importlib

import keras

from samenet.backend import Backend, BuildConfig, split_device
from samenet.errors import UnsupportedError

from .builder import KerasModel


def check_keras(keras_backend: str, label: str) -> None:
    """Raises UnsupportedError unless Keras 3 runs on ``keras_backend`` (KERAS_BACKEND was
    set to another framework before Keras was first imported in this process)."""
    if not keras.__version__.startswith("3"):
        raise UnsupportedError(f"{label} backend needs Keras 3, found keras {keras.__version__}")
    if keras.backend.backend() != keras_backend:
        raise UnsupportedError(f"{label} backend: Keras runs on '{keras.backend.backend()}' "
                               f"(set KERAS_BACKEND={keras_backend})")


class GenericKerasBackend(Backend):
    """The generic layers, Keras' own BatchNormalization (biased running variance) and the
    weight and count plumbing of ``self.model`` (a KerasModel); its info is a KerasInfo."""

    def import_framework(self) -> None:
        check_keras(self.info.keras_backend, self.name)

    def version(self) -> str:
        framework = importlib.import_module(self.info.keras_backend)
        return f"keras {keras.__version__}, {self.info.keras_backend} {framework.__version__}"

    def resolve_build(self, config: BuildConfig) -> tuple[BuildConfig, str, int]:
        """The start of build(): config resolved (device kinds and precisions as declared),
        device kind and index."""
        gc.collect()  # Keras functional graphs are reference cycles (see the tf backend)
        config = self.info.resolve_config(config)
        kind, index = split_device(config.device)
        return config, kind, index

    def build_model(self, ir, config: BuildConfig, keras_device: str, **builder_options) -> None:
        """Builds ``self.model`` from the generic layers on ``keras_device``."""
        with keras.device(keras_device):
            self.model = KerasModel(ir, config, label=self.name, **builder_options)

    def set_weights(self, weights) -> None:
        self.model.set_weights(weights)

    def param_counts(self):
        return self.model.param_counts()
