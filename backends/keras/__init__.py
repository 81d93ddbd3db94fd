"""The Keras model shared by the tf, keras-torch and keras-jax backends (a library, not a backend).

    * ``builder``: the IR as a Keras 3 functional model (``KerasModel``) and its one builder
      table ``BUILDERS``, the table the Keras backends' metadata names (``BUILDERS_MODULE``).
    * ``layers``: the layer classes written in ``keras.ops`` (``GENERIC``, a ``LayerSet``).
    * ``backend``: ``GenericKerasBackend``, what the backends running Keras on another
      framework (keras-torch, keras-jax) share.

This ``__init__`` imports no framework: it holds the metadata those backends share
(:class:`KerasInfo`). The other modules import Keras at the top, so KERAS_BACKEND must be set
before any of them is imported (each backend's ``impl`` sets it first). Nothing here knows
the backends that use it: removing one is deleting its package and its registry line.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

from samenet.backend import BackendInfo

BUILDERS_MODULE = "samenet.backends.keras.builder"
"""The module of the Keras builder table (``BackendInfo.builders`` of every Keras backend)."""

LAYOUT_OPTION = {"layout": ("channels_last", "channels_first")}
"""The Keras backends' one option: activation layout (NHWC, what Keras users run, by default)."""


class KerasInfo(BackendInfo):
    """Metadata of a backend running the Keras model on another framework (Keras' own layers,
    its BatchNormalization: biased running variance). ``keras_backend`` is Keras' name of the
    framework, also its import name ("torch", "jax")."""

    framework = "keras"
    distributions = ("keras",)
    builders = BUILDERS_MODULE
    options = LAYOUT_OPTION
    bn_variance = "biased"
    keras_backend: ClassVar[str]

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("keras", self.keras_backend))

    def env_vars(self, threads: int, tuned: bool) -> dict[str, str]:
        return {"KERAS_BACKEND": self.keras_backend, **super().env_vars(threads, tuned)}
