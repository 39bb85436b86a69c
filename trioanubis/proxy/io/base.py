"""The readiness interface both backends implement (see trioanubis.proxy.io for the contract)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import trio

# What a relay's direction waits for next (the relay's `advance` returns one):
READ: Final = 0  # its source socket to become readable
WRITE: Final = 1  # its destination socket to take more
AGAIN: Final = 2  # nothing: it stopped for fairness with more to read; advance it after a checkpoint
OVER: Final = 3  # nothing ever: this direction is over


class Driven(Protocol):
    """What a backend needs of the relay it drives (proxy/relay.py's `Relay`)."""

    client_fd: int
    server_fd: int
    # The epoll backend's: the task parked for this relay.
    parked: Any
    # Where the portable backend's nursery scope goes, so that ending the relay cancels it.
    scope: trio.CancelScope | None
    # What a step taken by the dispatcher raised, for `drive` to raise in the relay's task.
    error: Exception | None

    @property
    def end(self) -> str:
        """Why the relay ended; "" while it runs. Once set, `drive` returns."""
        ...

    def advance(self, upstream: bool) -> int:
        """Move one direction as far as it goes without waiting; what it waits for (READ, ...)."""
        ...

    def ready(self, fd: int, readable: bool, writable: bool) -> bool:
        """Advance what waited for `fd`; True when the relay's task is needed (ended, or AGAIN)."""
        ...

    def resume(self) -> bool:
        """Advance the directions that wait for a turn (both, at first); True if one must wait again."""
        ...

    def stopped(self) -> None:
        """`drive` is over (the end, an exception or a cancellation): release what the steps opened."""


class Readiness(Protocol):
    """What the relay and the connect path need from a readiness backend."""

    name: str
    # Sockets whose peer sent FIN or failed, seen by an edge the relay may not
    # have read to the end: after a short read on one of these the relay reads
    # again instead of waiting. Always empty on a level-triggered backend.
    hung_up: set[int]
    # Whether `hung_up` takes in every socket whose wake-up carried an error or hang-up,
    # so that a connect woken without one is known to have succeeded (no SO_ERROR call).
    reports_errors: bool
    # Whether bulk directions may move through a pipe with splice(2).
    splice: bool
    # Trio's clock (the relay stamps connection times with it).
    now: Callable[[], float]

    def register(self, fd: int) -> None:
        """Make `fd` (a relay or connecting socket) waitable; once per socket."""

    def wait_readable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` may have bytes, EOF or an error."""
        ...

    def wait_writable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` may take more bytes (or a connect finished)."""
        ...

    def interrupt(self, fd: int, error: Callable[[], BaseException]) -> bool:
        """Wake a plain wait on `fd` (no stepper), raising `error()` in it; False when none waited.

        A driven relay is ended by `Relay.finish`, not by this.
        """
        ...

    def unregister(self, fd: int) -> None:
        """Hand `fd` over to Trio's own waits (a TLS connection's sockets: tls_relay.py)."""

    def forget(self, fd: int) -> None:
        """Wake whatever waits on `fd` with ClosedResourceError; call before closing it."""

    def close(self, sock: socket.socket) -> None:
        """Wake the socket's waiters, then close it."""

    def open_pipe(self) -> tuple[int, int, int] | None:
        """A non-blocking pipe for splice (read end, write end, capacity), or None."""
        ...

    async def drive(self, relay: Driven) -> None:
        """Run `relay` in the calling task until it ends (`relay.end`); raise what a step raised.

        Both its sockets are registered. Cancellation stops it; the caller closes the sockets.
        However it returns, it calls `relay.stopped()` last.
        """

    def wake(self, relay: Driven) -> None:
        """The relay ended from outside its task (the Timer, a step): let `drive` return."""

    async def run(self) -> None:
        """The backend's task for the process's lifetime (the dispatcher, or nothing)."""
