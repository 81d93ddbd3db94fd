"""Backends that misbehave on purpose, for the runner's tests (registered via SAMENET_BACKENDS).

Each is the numpy backend with one step changed; ``INFO_<NAME>`` is its metadata, registered
as ``name=tests.core.fake_backends:INFO_<NAME>``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from samenet.backends.numpy import NumpyInfo
from samenet.backends.numpy.impl import NumpyBackend
from samenet.backend import Capabilities


class _Fake(NumpyBackend):
    def infer_step(self, batch):
        self.misbehave()
        return super().infer_step(batch)

    def misbehave(self):
        raise NotImplementedError


class Segfault(_Fake):
    def misbehave(self):
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class Hang(_Fake):
    def misbehave(self):
        time.sleep(3600)


class Oom(_Fake):
    def misbehave(self):
        raise MemoryError("cannot allocate 1 TB")


class Killed(_Fake):
    def misbehave(self):
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer, or a user's kill -9, does


class Exits(_Fake):
    def misbehave(self):
        os._exit(3)


class Slow(NumpyBackend):
    """Takes a second per step, to leave time to kill a sweep."""

    def infer_step(self, batch):
        time.sleep(1.0)
        return super().infer_step(batch)


class InferOnly(NumpyBackend):
    """An inference-only backend: its training step must never be called."""

    def train_step(self, batch):
        raise AssertionError("train_step called on a backend without the train capability")


def _info(name: str, impl: str, **attrs) -> NumpyInfo:
    cls = type(f"{impl}Info", (NumpyInfo,), {"name": name, "impl": f"fake_backends:{impl}",
                                             "reference": False, **attrs})
    return cls()


INFO_SEGFAULT = _info("segfault", "Segfault")
INFO_HANG = _info("hang", "Hang")
INFO_OOM = _info("oom", "Oom")
INFO_KILLED = _info("killed", "Killed")
INFO_EXITS = _info("exits", "Exits")
INFO_SLOW = _info("slow", "Slow")
INFO_GHOST = _info("ghost", "Segfault", framework="no_such_framework_xyz")
INFO_INFER_ONLY = _info("infer-only", "InferOnly", capabilities=Capabilities(
    train=False, infer=True, masks=False, set_lr=False, fp64=False, devices=("cpu",), precisions=("fp32",)))
