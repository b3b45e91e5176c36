"""Processes of the trainer that must not outlive the process that started them."""
from __future__ import annotations

import ctypes
import os
import signal

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when `parent` (default: the current parent) exits,
    and exit at once if it already has.

    Linux ties the signal to the thread that started this process: the parent must have started
    it from a thread that lives as long as the parent does (torchrun's agent and the
    DataLoader both start their children from the main thread)."""
    expected = os.getppid() if parent is None else parent
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected:  # the parent died before the line above took effect
        os._exit(1)
