"""Per-connection timeouts, enforced by one task for the whole process.

Theory of operation: a connection's timeouts (connect, failover, idle,
half-close) change with every byte it moves, so giving each connection its
own Trio deadline would cost a heap update per chunk and a scope per connect.
Instead every connection registers with the `Timer` once it starts
connecting (`Connection.watch`; it leaves when it closes), one task that wakes
every `tick` seconds. Its cost follows the deadlines, not the number of
connections: each relay sits in the bucket of the tick at which it is next
looked at (a timing wheel, like HAProxy's), and a tick looks only at its own
bucket:

- while connecting, every tick: the attempt's `connect_timeout` and the
  pool's `failover_timeout` cancel the attempt (`Connecting.cancel`); a
  client that closed or reset meanwhile (seen with a non-blocking MSG_PEEK)
  cancels it too, so a blackholed server never holds a socket for a client
  that has gone;
- while relaying, every twentieth of its shortest timeout (idle or
  half-close), at least one tick: no byte either way for `idle_timeout`
  (once one side sent EOF, for the shorter of that and `half_close_timeout`)
  ends the connection (`idle_timeout`). The relay only marks itself `active`
  when it moves bytes (reading the clock per chunk costs more than the bytes'
  own bookkeeping); each look turns that mark into `last_activity = now`.

The Timer decides nothing itself: it asks the connection (`end_with`) or its
connect attempt (`Connecting.cancel`), where the end is decided.

So an idle connection costs twenty looks per timeout, whatever the tick: at
the defaults (10 min idle, 1 min half-close) one look every 3 s. A connect
timeout fires at most one tick late; an idle timeout at most two looks late
(the look that saw the last byte, and the one that ends it). The tick is a
twentieth of the shortest timeout configured, between 5 ms and 500 ms, and a
relay's looks are a whole number of ticks no longer than a twentieth of its
own timeouts, so a timeout fires at most a tenth of its value late.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.proxy.connect import client_gone
from trioanubis.proxy.lifecycle import Watcher

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection

MIN_TICK: Final = 0.005
MAX_TICK: Final = 0.5
# A timeout fires at most two ticks late: at most 2/TICKS_PER_TIMEOUT of its value.
TICKS_PER_TIMEOUT: Final = 20


def tick_for(timeouts: Iterable[float]) -> float:
    shortest = min((t for t in timeouts if t > 0), default=MAX_TICK * TICKS_PER_TIMEOUT)
    return min(MAX_TICK, max(MIN_TICK, shortest / TICKS_PER_TIMEOUT))


@final
class Timer(Watcher):
    """The one task that enforces every connection's timeouts."""

    def __init__(self, tick: float = MAX_TICK) -> None:
        self.tick = tick
        self.connections: dict[Connection, int] = {}  # every watched connection → the tick of its next look
        self._wheel: dict[int, set[Connection]] = {}  # tick number → the connections looked at then
        self._ticks = 0  # the number of the next tick

    def watch(self, conn: Connection) -> None:
        """Look after `conn` from the next tick on (no clock read here)."""
        self._schedule(conn, self._ticks)

    def unwatch(self, conn: Connection) -> None:
        due = self.connections.pop(conn, None)
        if due is not None:
            self._wheel[due].discard(conn)

    def _schedule(self, conn: Connection, due: int) -> None:
        self.connections[conn] = due
        bucket = self._wheel.get(due)
        if bucket is None:
            bucket = self._wheel[due] = set()
        bucket.add(conn)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.tick)
            self.check(trio.current_time())

    def check(self, now: float) -> None:
        """One tick: look at the connections whose turn it is, and schedule their next look."""
        this = self._ticks
        self._ticks = this + 1
        bucket = self._wheel.pop(this, None)
        if not bucket:
            return
        tick = self.tick
        connections = self.connections
        # Connections looked at again at the same tick go into that bucket together.
        later: dict[int, list[Connection]] = {}
        steps: dict[float, int] = {}  # a connection's shortest timeout → ticks between its looks
        # Ending a connection or an attempt runs no task, so nothing unwatches meanwhile.
        for conn in bucket:
            connecting, relay = conn.connecting, conn.relay
            if connecting is not None:
                if now >= connecting.deadline:
                    connecting.cancel("timeout")
                elif now - connecting.started >= tick and client_gone(conn.client_sock,
                                                                      read_early=bool(conn.early)):
                    connecting.cancel("client_abort")
                step = 1
            elif relay is None:
                step = 1  # between connecting and relaying
            else:
                config = conn.pool.config  # type: ignore[union-attr]  # a relaying connection has its pool
                if relay.active:  # moved bytes since the last look: idle from now at the earliest
                    relay.active = False
                    relay.last_activity = now
                else:
                    limit = config.idle_timeout
                    if relay.first_eof:
                        limit = min(limit, config.half_close_timeout)
                    if now - relay.last_activity >= limit:
                        conn.end_with("idle_timeout")
                shortest = min(config.idle_timeout, config.half_close_timeout)
                step = steps.get(shortest, 0)
                if not step:
                    step = steps[shortest] = max(1, int(shortest / TICKS_PER_TIMEOUT / tick))
            due = this + step
            connections[conn] = due
            group = later.get(due)
            if group is None:
                later[due] = [conn]
            else:
                group.append(conn)
        wheel = self._wheel
        for due, conns in later.items():
            if due in wheel:
                wheel[due].update(conns)
            else:
                wheel[due] = set(conns)
