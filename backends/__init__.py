"""Backends: one package per framework, all implementing samenet.backend's protocol.

Each package's ``__init__`` declares the backend (a samenet.backend.BackendInfo: name, pins,
modes, options, capabilities, known gaps) and imports no framework; its ``impl`` module
imports the framework at the top and holds the Backend class and the builder table.
``backends/keras`` is the Keras model builder that the tf, keras-torch and keras-jax backends
share; it is not a backend itself.

The registry is pyproject.toml's ``samenet.backends`` entry points, one line per backend:
removing a backend is deleting its package and that line (a core test then points at its tox
envs and CI matrix entry). docs/extending.md walks through adding one.
"""
