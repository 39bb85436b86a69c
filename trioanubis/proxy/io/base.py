"""The readiness interface both backends implement (see trioanubis.proxy.io for the contract)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Stepper(Protocol):
    """What a task parked with `wait_readable(fd, stepper)` lets the backend do for it."""

    def step(self, fd: int) -> int | None:
        """Act on `fd` being readable; None to keep the task parked, else what to wake it with."""
        ...


class Readiness(Protocol):
    """What the relay and the connect path need from a readiness backend."""

    name: str
    # Sockets whose peer sent FIN or failed, seen by an edge the relay may not
    # have read to the end: after a short read on one of these the relay reads
    # again instead of waiting. Always empty on a level-triggered backend.
    hung_up: set[int]
    # Whether bulk directions may move through a pipe with splice(2).
    splice: bool
    # Trio's clock (the relay stamps connection times with it).
    now: Callable[[], float]

    def register(self, fd: int) -> None:
        """Make `fd` (a relay or connecting socket) waitable; once per socket."""

    def wait_readable(self, fd: int, stepper: Stepper | None = None) -> Awaitable[Any]:
        """Park until `fd` may have bytes, EOF or an error; with a stepper, until a step says wake."""
        ...

    def wait_writable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` may take more bytes (or a connect finished)."""
        ...

    def interrupt(self, fd: int, error: Callable[[], BaseException]) -> bool:
        """Wake a plain wait on `fd` (no stepper), raising `error()` in it; False when none waited.

        A pump parked with a stepper is ended by cancelling its relay, not by
        this (the epoll backend wakes it too; the portable one does not see it).
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

    async def run(self) -> None:
        """The backend's task for the process's lifetime (the dispatcher, or nothing)."""
