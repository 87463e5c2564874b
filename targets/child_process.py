"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

``Popen(..., preexec_fn=die_with_parent())`` asks the Linux kernel (``prctl(PR_SET_PDEATHSIG)``)
to send the child a signal when its parent goes, however it goes. A ``finally`` that stops the
child covers every orderly exit; this covers the rest (SIGKILL, a crash, an OOM kill).

Caveat of the kernel's contract: the signal fires when the *thread* that started the child ends.
So the request is made only from the process's main OS thread (where gevent greenlets, and the
threads gevent's monkey-patching fakes, run too); a child started from another OS thread, or
elsewhere than Linux, relies on its ``finally`` alone (``die_with_parent()`` returns None there).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1

_prctl = None
if sys.platform.startswith("linux"):
    try:  # looked up here, not after fork: a forked child should do as little as it can
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` making the child receive ``sig`` when this process dies (None off Linux
    or off the main OS thread)."""
    if _prctl is None or threading.get_native_id() != os.getpid():  # Linux: main thread's id == pid
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody will signal
            os.kill(os.getpid(), sig)

    return preexec


def preexec_steps(*steps):
    """One ``preexec_fn`` running each of ``steps`` (None entries skipped) in order; None if none."""
    steps = [step for step in steps if step is not None]
    if not steps:
        return None

    def run() -> None:
        for step in steps:
            step()

    return run
