"""Backends that misbehave on purpose, for the runner's tests (registered via SAMENET_BACKENDS)."""

from __future__ import annotations

import ctypes
import os
import signal
import time

from backends.numpy_backend import NumpyBackend


class _Fake(NumpyBackend):
    def infer_step(self, batch):
        self.misbehave()
        return super().infer_step(batch)

    def misbehave(self):
        raise NotImplementedError


class Segfault(_Fake):
    name = "segfault"

    def misbehave(self):
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class Hang(_Fake):
    name = "hang"

    def misbehave(self):
        time.sleep(3600)


class Oom(_Fake):
    name = "oom"

    def misbehave(self):
        raise MemoryError("cannot allocate 1 TB")


class Killed(_Fake):
    name = "killed"

    def misbehave(self):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


class Exits(_Fake):
    name = "exits"

    def misbehave(self):
        os._exit(3)


class Slow(NumpyBackend):
    """Takes a second per step, to leave time to kill a sweep."""

    name = "slow"

    def infer_step(self, batch):
        time.sleep(1.0)
        return super().infer_step(batch)
