"""The readiness interface both backends implement (see trioanubis.proxy.io for the contract).

Its surface, in Trio's spirit (`_core/_io_*.py` expose a few waits and
nothing of the relay): what a backend can do (`Capabilities`, one record),
the plain waits (`wait_readable`, `wait_writable`, and `interrupt` to end one
with a chosen error), a relay driven in its connection's task (`drive`, and
`wake` when it ended from outside), and the sockets' membership (`register`,
`unregister`, `forget`, `close`). What a backend keeps per relay while it
drives it lives in the relay's one opaque `driver` slot, which nothing else
reads.
"""

from __future__ import annotations

import _socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final, Protocol, final

import trio
from mypy_extensions import mypyc_attr

# What a relay's direction waits for next (the relay's `advance` returns one):
READ: Final = 0  # its source socket to become readable
WRITE: Final = 1  # its destination socket to take more
AGAIN: Final = 2  # nothing: it stopped for fairness with more to read; advance it after a checkpoint
OVER: Final = 3  # nothing ever: this direction is over

# Read once: in the compiled build a module-level Final is a static, a module global a lookup by name.
_perf_counter: Final = perf_counter


@final
@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a readiness backend offers, decided once when it is built."""

    name: str  # "epoll" or "portable": what `anubis check` and the start-up log name
    # Whether bulk directions may move through a pipe with splice(2).
    splice: bool
    # Whether `hung_up` takes in every socket whose wake-up carried an error or hang-up,
    # so that a connect woken without one is known to have succeeded (no SO_ERROR call).
    reports_errors: bool
    # Whether readiness is edge-triggered (a short read must consult `hung_up` before waiting).
    edge_triggered: bool


class Driven(Protocol):
    """What a backend needs of the relay it drives (proxy/relay.py's `Relay`)."""

    client_fd: int
    server_fd: int
    # The backend's own state for this relay while it drives it (the parked task, a nursery's scope).
    driver: Any

    @property
    def over(self) -> bool:
        """True once the relay ended; `drive` then returns."""
        ...

    @property
    def up(self) -> Any:
        """Its client → server direction (what `advance` takes), once it runs."""
        ...

    @property
    def down(self) -> Any: ...

    def advance(self, direction: Any) -> int:
        """Move one direction as far as it goes without waiting; what it waits for (READ, ...)."""
        ...

    def hang_up(self, fd: int) -> None:
        """`fd`'s peer closed or failed (an edge-triggered backend's hang-up): a short read from it
        reads again instead of waiting."""

    def ready(self, fd: int, readable: bool, writable: bool) -> bool:
        """Advance what waited for `fd`; True when the relay's task is needed (ended, or AGAIN)."""
        ...

    def resume(self) -> bool:
        """Advance the directions that wait for a turn (both, at first); True if one must wait again."""
        ...

    def send_held(self, direction: Any) -> bool:
        """Send what `direction` holds (the client's bytes read before connecting), then wait to
        read; True when the relay's task is needed (it ended)."""
        ...

    def stopped(self) -> None:
        """`drive` is over (the end, an exception or a cancellation): release what the steps opened."""

    def forward_eof(self, direction: Any) -> None:
        """Pass on the first EOF `direction` read (a shutdown towards its destination), unless ended."""


@mypyc_attr(allow_interpreted_subclasses=True)  # the portable backend is not compiled (setup.py)
class Readiness:
    """What the relay and the connect path need from a readiness backend: both derive from it (a
    class, not a protocol, so that the compiled relay and connect path call the epoll backend natively)."""

    caps: Capabilities
    # Sockets whose peer sent FIN or failed, seen by an edge the relay may not
    # have read to the end: after a short read on one of these the relay reads
    # again instead of waiting (a driven relay's directions are told too: `hang_up`).
    # Always empty on a level-triggered backend.
    hung_up: set[int]
    # How `now` reads Trio's clock: through `clock` when it is set (before the run's clock is taken,
    # or a clock other than Trio's own, such as a test's MockClock), else as Trio's SystemClock reads
    # itself, its offset plus perf_counter(): in the compiled build a native call, not a Python one
    # (five a connection).
    clock: Callable[[], float] | None
    clock_offset: float
    # The relays' read buffer: one per backend (so per balancer), safe because one task runs at a time.
    scratch: memoryview
    # How many times the dispatcher has taken its ready list (0 on a backend without one): a count that
    # moves when the world may have, which tells the listener's `Acceptor` when a count it read of its
    # waiting clients is still this moment's.
    looks: int

    def now(self) -> float:
        """Trio's clock: connections stamp their times with it."""
        clock = self.clock
        if clock is None:
            return self.clock_offset + _perf_counter()
        return clock()

    def take_clock(self, clock: trio.abc.Clock) -> None:
        """Read the run's `clock` from now on: without its Python method when it is Trio's own
        SystemClock and reads the same that way (within a millisecond: a Trio whose clock works
        otherwise keeps its method), else through its method."""
        offset = getattr(clock, "offset", None)
        self.clock = clock.current_time
        if type(clock).__name__ == "SystemClock" and isinstance(offset, float):
            self.clock, self.clock_offset = None, offset
            if abs(self.now() - clock.current_time()) >= 0.001:
                self.clock = clock.current_time

    def register(self, fd: int, *, writable: bool = False) -> None:
        """Make `fd` (a relay or connecting socket) waitable; once per socket.

        `writable`: something will wait to write to it at once (a connect in progress).
        """
        raise NotImplementedError

    def want_writable(self, fd: int) -> None:
        """A driven relay's direction waits to write to `fd` (its peer stopped taking bytes)."""
        raise NotImplementedError

    def wait_readable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` may have bytes, EOF or an error."""
        raise NotImplementedError

    def wait_writable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` may take more bytes (or a connect finished)."""
        raise NotImplementedError

    def interrupt(self, fd: int, error: Callable[[], BaseException]) -> bool:
        """Wake a plain wait on `fd` (not a driven relay), raising `error()` in it; False when none waited."""
        raise NotImplementedError

    def unregister(self, fd: int) -> None:
        """Hand `fd` over to Trio's own waits (the stream relay's and the opening's sockets)."""
        raise NotImplementedError

    def forget(self, fd: int) -> None:
        """Wake whatever waits on `fd` with ClosedResourceError; call before closing it."""
        raise NotImplementedError

    def close(self, sock: _socket.socket) -> None:
        """Wake the socket's waiters, then close it."""
        raise NotImplementedError

    async def drive(self, relay: Driven) -> None:
        """Run `relay` in the calling task until it is over; raise what a step raised.

        Its server socket is registered (it connected through this backend); `drive`
        registers the client socket. Cancellation stops it; the caller closes the sockets.
        However it returns, it calls `relay.stopped()` last.
        """
        raise NotImplementedError

    def wake(self, relay: Driven) -> None:
        """The relay ended from outside its task (the connection stopped it): let `drive` return."""
        raise NotImplementedError

    def pass_eof(self, relay: Driven, direction: Any) -> None:
        """A direction of `relay` read the first EOF: call `relay.forward_eof(direction)`, at once or
        soon (epoll: after its next batch of events, unless it sleeps; never later than that)."""
        raise NotImplementedError

    async def run(self) -> None:
        """The backend's task for the process's lifetime (the dispatcher, or nothing)."""
        raise NotImplementedError

    def shut_down(self) -> None:
        """Release the backend's own resources, once nothing uses it (its balancer has stopped).

        Not at the end of `run`: when a whole tree is cancelled at once, a
        connection may still register a socket after the dispatcher stopped.
        """
        raise NotImplementedError


# One read's worth of bytes; also the most a relay's direction ever holds while
# its peer is not reading. 64 KiB is the size where loopback throughput stops
# improving with bigger reads.
CHUNK_SIZE: Final = 65536


def new_scratch() -> memoryview:
    """A backend's read buffer for its relays."""
    return memoryview(bytearray(CHUNK_SIZE))
