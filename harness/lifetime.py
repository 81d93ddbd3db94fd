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
from typing import Callable

PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent(signal_mask: set | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process (its parent) dies;
    None where the platform has no such signal.

    Args:
        signal_mask: The signal mask the child is to start with, where the parent blocks
            signals while it starts it (see held_interrupts).
    """
    if _PRCTL is None and signal_mask is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Resolved before the fork: after it, only the foreign call and a few system calls run.
        if signal_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)

    return preexec


def start_holding_interrupts(argv: list[str], **popen_kwargs) -> tuple[subprocess.Popen, set]:
    """Starts a child with Ctrl-C held back until its Popen exists, so none is lost between.

    Without this, a SIGINT arriving after the child's exec but before Popen returns raises
    KeyboardInterrupt where no handler knows the child: it would run on unrecorded. The caller
    releases the held signal with ``release_interrupts(mask)`` inside the ``try`` that handles
    the interrupt; a Ctrl-C held meanwhile is raised there.

    Returns:
        The process and the signal mask to restore.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(argv, preexec_fn=die_with_parent(mask), **popen_kwargs), mask
    except BaseException:
        release_interrupts(mask)
        raise


def release_interrupts(mask: set) -> None:
    """Restores the signal mask; Python raises a Ctrl-C held back meanwhile right here."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
