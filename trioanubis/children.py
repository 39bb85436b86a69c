"""Child processes (replicas, workers): waiting for their exit, and dying with their parent.

Theory of operation: the spawner's replicas (spawn.py) and the supervisor's
workers (workers/) are both started with `subprocess.Popen` from the loop's
thread (PR_SET_PDEATHSIG follows the *thread* that forked, so a helper
thread's exit would signal them), and waited for here without blocking the
loop: `wait_exit` waits on a pidfd where Linux has one, else in a worker
thread that is abandoned on cancellation. `set_death_signal` asks the kernel
(Linux, prctl through ctypes, decided at run time and never at import) to
send a signal to the calling process when its parent dies, and says whether
the parent is still the one expected (it may have died before the request
took hold). Elsewhere it does nothing and the callers' own channels (a
closing pipe, a process group) clean up.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Final

import trio

# prctl(2) option: the signal the kernel sends when the parent dies.
PR_SET_PDEATHSIG: Final = 1


async def wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for `popen` to exit without blocking the loop: a pidfd on Linux, else a worker thread."""
    pidfd_open = getattr(os, "pidfd_open", None)
    fd = -1
    if pidfd_open is not None:
        with contextlib.suppress(OSError):
            fd = pidfd_open(popen.pid)
    if fd < 0:
        return await trio.to_thread.run_sync(popen.wait, abandon_on_cancel=True)
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return popen.wait()


def set_death_signal(signum: int, parent_pid: int) -> bool:
    """Ask for `signum` when the parent dies (Linux); False if `parent_pid` is no longer the parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return os.getppid() == parent_pid
