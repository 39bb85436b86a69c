"""Per-connection timeouts, enforced by one task for the whole process.

Theory of operation: a connection's timeouts (connect, failover, idle,
half-close) change with every byte it moves, so giving each connection its
own Trio deadline would cost a heap update per chunk and a scope per connect.
Instead every live connection registers with the `Timer`, which wakes every
`tick` seconds and checks each one against the clock, like HAProxy's timer
wheel:

- while connecting: the attempt's `connect_timeout` and the pool's
  `failover_timeout` cancel the attempt (`Relay.cancel_attempt`); a client that closed or reset
  meanwhile (seen with a non-blocking MSG_PEEK) cancels it too, so a
  blackholed server never holds a socket for a client that has gone;
- while relaying: no byte either way for `idle_timeout` (once one side sent
  EOF, for the shorter of that and `half_close_timeout`) ends the relay. The
  relay only marks itself `active` when it moves bytes (reading the clock per
  chunk costs more than the bytes' own bookkeeping); each tick turns that
  mark into `last_activity = now`.

A connect timeout therefore fires at most one tick late, an idle timeout at
most two (the tick that saw the last byte, and the one that checks). The tick
is a twentieth of the shortest timeout configured, between 5 ms and 500 ms,
so a timeout fires at most a tenth of its value late.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, final

import trio

if TYPE_CHECKING:
    from trioanubis.relay import Relay

# The client socket is non-blocking already; MSG_DONTWAIT (not on Windows) only makes sure.
_PEEK: Final = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)

MIN_TICK: Final = 0.005
MAX_TICK: Final = 0.5
# A timeout fires at most two ticks late: at most 2/TICKS_PER_TIMEOUT of its value.
TICKS_PER_TIMEOUT: Final = 20


def tick_for(timeouts: Iterable[float]) -> float:
    shortest = min((t for t in timeouts if t > 0), default=MAX_TICK * TICKS_PER_TIMEOUT)
    return min(MAX_TICK, max(MIN_TICK, shortest / TICKS_PER_TIMEOUT))


def client_gone(client: socket.socket) -> bool:
    """True when the client has closed or reset (peeking never consumes its bytes)."""
    try:
        return client.recv(1, _PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@final
class Timer:
    """The one task that enforces every connection's timeouts."""

    def __init__(self, tick: float = MAX_TICK) -> None:
        self.tick = tick
        self.connections: set[Relay] = set()

    def watch(self, relay: Relay) -> None:
        self.connections.add(relay)

    def unwatch(self, relay: Relay) -> None:
        self.connections.discard(relay)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.tick)
            self.check(trio.current_time())

    def check(self, now: float) -> None:
        # No copy of the set: cancelling a scope runs no task, so nothing unwatches meanwhile.
        for relay in self.connections:
            if relay.connecting:
                if now >= relay.attempt_deadline:
                    relay.cancel_attempt("timeout")
                elif now - relay.connect_started >= self.tick and client_gone(relay.client):
                    relay.cancel_attempt("client_abort")
            elif relay.active:  # moved bytes since the last tick: idle from now at the earliest
                relay.active = False
                relay.last_activity = now
            else:
                limit = relay.idle_timeout
                if relay.first_eof:
                    limit = min(limit, relay.half_close_timeout)
                if now - relay.last_activity >= limit:
                    relay.finish("idle_timeout")
