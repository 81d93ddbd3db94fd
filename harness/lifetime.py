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
import subprocess
import threading
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


def start_holding_interrupts(argv: list[str], **popen_kwargs) -> tuple[subprocess.Popen, list]:
    """Starts a child (dying with its parent) with Ctrl-C held back until its Popen exists.

    Without this, a SIGINT after the child's exec but before Popen returns raises
    KeyboardInterrupt where no handler knows the child: it would run on, unrecorded. The caller
    calls ``release_interrupts(held)`` first thing in the ``try`` that handles the interrupt,
    which raises a Ctrl-C held meanwhile. Python runs signal handlers in the main thread only,
    so a starter in another thread holds nothing back (the interrupt goes to the main thread).

    Returns:
        The process and the list of held interrupts.
    """
    held: list = []
    holding = threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT))
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if holding else None
    try:
        return subprocess.Popen(argv, preexec_fn=die_with_parent(), **popen_kwargs), held
    finally:
        if holding:
            signal.signal(signal.SIGINT, previous)


def release_interrupts(held: list) -> None:
    """Raises the Ctrl-C that start_holding_interrupts held back, if one came."""
    if held:
        raise KeyboardInterrupt
