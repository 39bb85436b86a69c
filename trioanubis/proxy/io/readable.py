"""One task's repeated wait for one descriptor to be readable, in Trio's epoll without Trio's frames.

Theory of operation: two tasks wait on one descriptor again and again, the
epoll dispatcher on its epoll (epoll.py) and a listener's accept loop on its
socket (listener.py), about three times a connection when connections come
one at a time (a worker of two on two shared cores wakes about once a
connection). `trio.lowlevel.wait_readable(fd)` on Linux is Trio's epoll
manager putting the task in its table (`EpollIOManager._registered[fd]`, an
`EpollWaiters`), re-arming the descriptor's one-shot registration
(`epoll_ctl(EPOLL_CTL_MOD)`) and parking the task until its run loop sees
the event: nine Python calls and three objects (the table's entry, the
abort closure, the trap message) at each wait. `ReadableWait(fd)`, made once
in the task that waits, does the same three steps on the same table with
objects made once: its own `EpollWaiters` (put back in the table when Trio
has dropped the entry), the re-arming `epoll_ctl`, and the C helper's park
(woken.py `parking`). Anything else, a descriptor Trio's epoll does not hold
yet, a failed `epoll_ctl`, another reader, a wait awaited in a task other
than the one that made it, goes to Trio's own function, which registers,
raises or reports as it always does.

Used only where each step was checked: Trio's epoll manager of a Trio no
newer than `PARKED_TRIO` (its table is private), the C park, and this module
compiled. Trio protects its own wait from KeyboardInterrupt between taking
its place in the table and parking: a task interrupted there stays the
table's reader, refused its next wait and rescheduled by the event wherever
it runs. Compiled code runs no Python signal handler between `wait()`
taking the place and its caller's `await` parking, so **every caller is a
compiled module** (setup.py builds all of them or none; a test checks that
each module using this one is among them). Elsewhere `wait()` is
`trio.lowlevel.wait_readable(fd)`.
"""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import trio

from trioanubis.proxy.io.woken import PARKED_IN_C, parking, trio_checked

_EPOLLIN: Final[int] = getattr(select, "EPOLLIN", 0x001)
_EPOLLOUT: Final[int] = getattr(select, "EPOLLOUT", 0x004)
_EPOLLONESHOT: Final[int] = getattr(select, "EPOLLONESHOT", 1 << 30)
_SUCCEEDED: Final = trio.lowlevel.Abort.SUCCEEDED
_wait_readable: Final = trio.lowlevel.wait_readable

# This module's build: the compiled one names its extension here.
COMPILED: Final = not __file__.endswith((".py", ".pyc"))


def trio_epoll() -> Any:
    """The running loop's epoll manager, if its table is the one `ReadableWait` was checked against
    (Trio no newer than `PARKED_TRIO`), else None."""
    if not trio_checked():
        return None
    try:
        from trio._core._io_epoll import EpollIOManager, EpollWaiters
        from trio._core._run import GLOBAL_RUN_CONTEXT
    except ImportError:  # not Linux, or Trio moved them
        return None
    try:
        io = GLOBAL_RUN_CONTEXT.runner.io_manager
    except AttributeError:  # outside Trio's run
        return None
    if type(io) is not EpollIOManager or not isinstance(getattr(io, "_registered", None), dict):
        return None
    entry = EpollWaiters()
    if not all(hasattr(entry, name) for name in ("read_task", "write_task", "current_flags")):
        return None
    return io


def fast_trio_epoll() -> Any:
    """`trio_epoll()` where this build may use it (compiled, with the C park), else None."""
    return trio_epoll() if COMPILED and PARKED_IN_C else None


def _aborting(registered: dict[int, Any], fd: int, update: Callable[[int], None]) -> Callable[[object], Any]:
    """Trio's abort for a wait on `fd` (its `_epoll_wait`'s): leave the table, disarm or drop the entry."""

    def abort(_: object) -> Any:
        entry = registered.get(fd)
        if entry is not None:
            entry.read_task = None
            update(fd)
        return _SUCCEEDED

    return abort


@final
class ReadableWait:
    """`await trio.lowlevel.wait_readable(fd)` for the task that made it, as `await wait.wait()`.

    Made in the task that will wait (it takes the running task and loop);
    awaited in another task, it is Trio's own wait. `trio_io` is Trio's epoll
    manager to use (`trio_epoll()`), None for what this build may use
    (`fast_trio_epoll()`).
    """

    def __init__(self, fd: int, trio_io: Any = None) -> None:
        self.fd = fd
        io = fast_trio_epoll() if trio_io is None else trio_io
        self._task: Any = trio.lowlevel.current_task()
        self._context: Any = None  # Trio's run context: its `task` is the running task
        # What the fast path uses (None, or empty, on the slow path).
        self._registered: dict[int, Any] = {}
        self._entry: Any = None
        self._modify: Any = None
        self._park: Awaitable[object] | None = None
        if io is not None:
            from trio._core._io_epoll import EpollWaiters
            from trio._core._run import GLOBAL_RUN_CONTEXT

            self._context = GLOBAL_RUN_CONTEXT
            self._registered = io._registered
            self._entry = EpollWaiters()
            self._modify = io._epoll.modify
            self._park = parking(_aborting(self._registered, fd, io._update_registrations))

    @property
    def fast(self) -> bool:
        """True where the waits take Trio's table's path (else they are Trio's function)."""
        return self._park is not None

    def wait(self) -> Awaitable[object]:
        """The wait: await it once, in the task that made this."""
        fd = self.fd
        park = self._park
        if park is None or self._context.task is not self._task:  # not the task it was made in
            return _wait_readable(fd)
        registered = self._registered
        entry = registered.get(fd)
        if entry is None:  # Trio dropped the entry at the last wake-up (or never had one): ours, fresh
            entry = self._entry
            entry.read_task = None
            entry.write_task = None
            entry.current_flags = 0
            registered[fd] = entry
        elif entry.read_task is not None:  # another reader: Trio's wait raises BusyResourceError
            return _wait_readable(fd)
        wanted = _EPOLLIN | (_EPOLLOUT if entry.write_task is not None else 0)
        if entry.current_flags != wanted:
            try:
                self._modify(fd, wanted | _EPOLLONESHOT)
            except OSError:  # not in Trio's epoll yet (ENOENT), or gone: Trio's wait adds it or raises
                return _wait_readable(fd)
            entry.current_flags = wanted
        entry.read_task = self._task
        return park
