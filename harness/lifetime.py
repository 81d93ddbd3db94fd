"""Processes that never outlive the process that started them.

Every process the harness starts (a cell, a data-parallel rank or helper, a parity or training
child) is started with ``preexec_fn=die_with_parent()``: Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) then ends it when its parent dies, even by SIGKILL, when
no ``finally`` of the parent can run. Where prctl is missing (not Linux) it does nothing, and
the parent's own kill of the process group on timeout or error remains.

The signal is sent when the parent's *thread* that started the child ends; the harness's
starters wait for their children in that thread, so this holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process (its parent) dies;
    None where the platform has no such signal."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Resolved before the fork: after it, only the foreign call and two system calls run.
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec
