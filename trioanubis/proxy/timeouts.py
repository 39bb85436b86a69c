"""Per-connection timeouts, enforced by one task for the whole process.

Theory of operation: a connection's timeouts (connect, failover, idle,
half-close) change with every byte it moves, so giving each connection its
own Trio deadline would cost a heap update per chunk and a scope per connect.
Instead every live connection registers with the `Timer`, one task that wakes
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
  ends the relay. The relay only marks itself `active` when it moves bytes
  (reading the clock per chunk costs more than the bytes' own bookkeeping);
  each look turns that mark into `last_activity = now`.

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

if TYPE_CHECKING:
    from trioanubis.proxy.relay import Relay

MIN_TICK: Final = 0.005
MAX_TICK: Final = 0.5
# A timeout fires at most two ticks late: at most 2/TICKS_PER_TIMEOUT of its value.
TICKS_PER_TIMEOUT: Final = 20


def tick_for(timeouts: Iterable[float]) -> float:
    shortest = min((t for t in timeouts if t > 0), default=MAX_TICK * TICKS_PER_TIMEOUT)
    return min(MAX_TICK, max(MIN_TICK, shortest / TICKS_PER_TIMEOUT))


@final
class Timer:
    """The one task that enforces every connection's timeouts."""

    def __init__(self, tick: float = MAX_TICK) -> None:
        self.tick = tick
        self.connections: dict[Relay, int] = {}  # every watched relay → the tick it is looked at next
        self._wheel: dict[int, set[Relay]] = {}  # tick number → the relays looked at then
        self._ticks = 0  # the number of the next tick

    def watch(self, relay: Relay) -> None:
        """Look after `relay` from the next tick on (no clock read here)."""
        self._schedule(relay, self._ticks)

    def unwatch(self, relay: Relay) -> None:
        due = self.connections.pop(relay, None)
        if due is not None:
            self._wheel[due].discard(relay)

    def _schedule(self, relay: Relay, due: int) -> None:
        self.connections[relay] = due
        bucket = self._wheel.get(due)
        if bucket is None:
            bucket = self._wheel[due] = set()
        bucket.add(relay)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.tick)
            self.check(trio.current_time())

    def check(self, now: float) -> None:
        """One tick: look at the relays whose turn it is, and schedule their next look."""
        this = self._ticks
        self._ticks = this + 1
        bucket = self._wheel.pop(this, None)
        if not bucket:
            return
        tick = self.tick
        connections = self.connections
        # Relays looked at again at the same tick go into that bucket together.
        later: dict[int, list[Relay]] = {}
        steps: dict[float, int] = {}  # a relay's shortest timeout → ticks between its looks
        # Cancelling a scope runs no task, so nothing unwatches meanwhile.
        for relay in bucket:
            connecting = relay.connecting
            if connecting is not None:
                if now >= connecting.deadline:
                    connecting.cancel("timeout")
                elif now - connecting.started >= tick and client_gone(relay.client):
                    connecting.cancel("client_abort")
                step = 1
            else:
                if relay.active:  # moved bytes since the last look: idle from now at the earliest
                    relay.active = False
                    relay.last_activity = now
                else:
                    limit = relay.idle_timeout
                    if relay.first_eof:
                        limit = min(limit, relay.half_close_timeout)
                    if now - relay.last_activity >= limit:
                        relay.finish("idle_timeout")
                shortest = min(relay.idle_timeout, relay.half_close_timeout)
                step = steps.get(shortest, 0)
                if not step:
                    step = steps[shortest] = max(1, int(shortest / TICKS_PER_TIMEOUT / tick))
            due = this + step
            connections[relay] = due
            group = later.get(due)
            if group is None:
                later[due] = [relay]
            else:
                group.append(relay)
        wheel = self._wheel
        for due, relays in later.items():
            if due in wheel:
                wheel[due].update(relays)
            else:
                wheel[due] = set(relays)
