"""The portable readiness backend: every wait is Trio's own, every byte is copied.

Theory of operation: a wait is `trio.lowlevel.wait_readable` /
`wait_writable` on the socket's descriptor, so it works wherever Trio runs
(epoll on Linux, kqueue on macOS and BSD, Trio's AFD backend on Windows).
Trio's waits are level-triggered: a socket that already has bytes, a FIN or
an error is readable at once, so a wait after a short read never misses a
FIN queued behind the data, and `hung_up` stays empty.

A relay is driven (`drive`) with one task per direction in a nursery of
the connection's: each advances its direction and waits, with Trio's waits,
for what the direction waits for (a read, room to write, a turn). Ending
the relay (`wake`) cancels the nursery, whose scope is the relay's `driver`
meanwhile (its `_Drive`); a bug in a step is raised in that direction's task and ends the
connection. At the usual end, the second EOF, the direction that read it is
the only task left and returns by itself: `wake` cancels only when another
direction task may be parked in a wait (cancelling is Trio's dearest step). A bulk direction keeps
copying through the relay's 64 KiB chunk (`splice` is False), so
backpressure holds at most one chunk per direction, as on the epoll backend
with splice off.

A plain wait runs in a cancel scope of its own, kept per descriptor, so
that `interrupt` can end it with a chosen error (the Timer cancels a connect
attempt this way, as on the epoll backend). A relay's direction waits
without one (see `_direction`), so `interrupt` does not see it. `forget` and `close` use Trio's
`notify_closing`, which wakes a waiter with `ClosedResourceError`. What this
costs against the epoll backend: a Trio epoll_ctl pair and a task switch per
wait, a nursery and a second task per connection, and every bulk byte
copied through user space.
"""

from __future__ import annotations

import _socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import trio

from trioanubis.proxy.io.base import (
    AGAIN,
    READ,
    WRITE,
    Capabilities,
    Driven,
    Readiness,
    new_scratch,
)


@final
class _Wait:
    """One parked wait: its scope, and the error `interrupt` asked for."""

    __slots__ = ("error", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.error: Callable[[], BaseException] | None = None


@final
class _Drive:
    """A driven relay's nursery scope, and the direction tasks still running in it."""

    __slots__ = ("scope", "tasks")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.tasks: set[trio.lowlevel.Task] = {trio.lowlevel.current_task()}


@final
class PortableReadiness(Readiness):
    """The `portable` readiness backend (see trioanubis.proxy.io)."""

    def __init__(self) -> None:
        # Trio's waits say only "ready" (a connect asks SO_ERROR); bulk bytes are copied.
        self.caps = Capabilities("portable", splice=False, reports_errors=False, edge_triggered=False)
        self.hung_up: set[int] = set()  # level-triggered: never needed, always empty
        self.scratch = new_scratch()
        self.looks = 0  # no dispatcher
        self.clock: Callable[[], float] | None = trio.current_time  # until `run` takes the run's clock
        self.clock_offset = 0.0
        self._readers: dict[int, _Wait] = {}
        self._writers: dict[int, _Wait] = {}

    def register(self, fd: int, *, writable: bool = False) -> None:
        """Nothing to do: Trio registers a descriptor for the length of each wait."""

    def want_writable(self, fd: int) -> None:
        """Nothing to do: a direction waits for writability with Trio's own wait."""

    def wait_readable(self, fd: int) -> Awaitable[object]:
        return self._wait(self._readers, fd, trio.lowlevel.wait_readable)

    def wait_writable(self, fd: int) -> Awaitable[object]:
        return self._wait(self._writers, fd, trio.lowlevel.wait_writable)

    async def drive(self, relay: Driven) -> None:
        """Run `relay` with one task per direction in a nursery, which ending the relay cancels."""
        self.register(relay.client_fd)  # nothing to do here, but the contract is the same
        try:
            async with trio.open_nursery() as nursery:
                relay.driver = drive = _Drive(nursery.cancel_scope)
                if relay.over:
                    return
                nursery.start_soon(_other_direction, relay, drive, name=_DIRECTION_TASK_NAME)
                try:
                    await _direction(relay, relay.up)
                finally:
                    drive.tasks.discard(trio.lowlevel.current_task())
        finally:
            relay.driver = None
            relay.stopped()

    def wake(self, relay: Driven) -> None:
        """Cancel the relay's nursery (its `driver` while it runs), unless the caller is the one
        direction task left: that one sees the relay over at its next step and returns."""
        drive = relay.driver
        if drive is None:
            return
        tasks = drive.tasks
        if len(tasks) != 1 or trio.lowlevel.current_task() not in tasks:
            drive.scope.cancel()

    def pass_eof(self, relay: Driven, direction: Any) -> None:
        """At once: a direction task runs its steps in Trio's turn, with no batch to wait for."""
        relay.forward_eof(direction)

    async def _wait(
        self, waiters: dict[int, _Wait], fd: int, wait: Callable[[int], Awaitable[None]]
    ) -> None:
        if fd in waiters:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        parked = waiters[fd] = _Wait()
        try:
            with parked.scope:
                await wait(fd)
        finally:
            if waiters.get(fd) is parked:
                del waiters[fd]
        if parked.error is not None:
            raise parked.error()

    def interrupt(self, fd: int, error: Callable[[], BaseException]) -> bool:
        woke = False
        for waiters in (self._readers, self._writers):
            parked = waiters.pop(fd, None)
            if parked is not None and parked.error is None:
                parked.error = error
                parked.scope.cancel()
                woke = True
        return woke

    def unregister(self, fd: int) -> None:
        """Nothing to do: every wait here is Trio's own already."""

    def forget(self, fd: int) -> None:
        trio.lowlevel.notify_closing(fd)  # stepped waits are Trio's own: not in our tables

    def close(self, sock: _socket.socket) -> None:
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)
        sock.close()

    def shut_down(self) -> None:
        """Nothing to release: Trio owns every wait."""

    async def run(self) -> None:
        """Nothing to dispatch; only take Trio's clock for `now`, then wait for the end."""
        self.take_clock(trio.lowlevel.current_clock())
        await trio.sleep_forever()


# A constant task name: Trio would otherwise format one string per task.
_DIRECTION_TASK_NAME: Final = "trioanubis.relay.server_to_client"


async def _other_direction(relay: Driven, drive: _Drive) -> None:
    """The server → client direction, in a task of its own that `drive` knows while it runs."""
    task = trio.lowlevel.current_task()
    drive.tasks.add(task)
    try:
        await _direction(relay, relay.down)
    finally:
        drive.tasks.discard(task)


async def _direction(relay: Driven, direction: Any) -> None:
    """One direction of a driven relay: advance it, wait for what it waits for, until it is over.

    No scope per wait here: a cancel scope per wait cost a third of the
    keep-alive rate, and nothing interrupts a direction (its relay is
    stopped instead, which cancels the nursery); `forget` still reaches it.
    """
    src, dst = direction.src_fd, direction.dst_fd
    while True:
        wants = relay.advance(direction)
        if wants == READ:
            await trio.lowlevel.wait_readable(src)
        elif wants == WRITE:
            await trio.lowlevel.wait_writable(dst)
        elif wants == AGAIN:
            await trio.lowlevel.checkpoint()
        else:
            return
