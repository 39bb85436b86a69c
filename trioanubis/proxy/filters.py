"""Filters: what the stream relay does to one direction's bytes, one effect per filter.

Theory of operation: a connection whose bytes something must touch (injected
faults today; bandwidth limits, mirroring and live toxics fit the same way)
is relayed by the stream relay (streams.py), whatever its transport. Each of
its directions runs its `Filter`s in order, at fixed points of the
direction's life, and nothing else about a filter is known to the relay:

- `on_read(data)`: every chunk read from the source, in order: return it (or
  a replacement) to pass it on, or None to drop it (a blackhole), or keep a
  copy (a mirror);
- `delay()`: how long the chunk is held before it may leave (latency); the
  relay then splits the direction into a reader and a sender around a
  bounded FIFO, so delays overlap instead of serialising;
- per piece of a chunk as it is sent: `piece(size)` (the most to send at once:
  slices, pacing steps, a cut that must land on an exact byte),
  `before_piece(size)` (wait: a token bucket), `after_piece(delivered)` (wait
  between slices; or say the connection must end here, as an end state:
  `fault_reset` after exactly `reset_after` bytes);
- `on_eof()`: whether the source's EOF is passed on (a blackhole swallows it;
  a filter may also wait here, to close late);
- `start(conn, nursery)`: a task of the filter's own in the relay's
  nursery (a mirror's writer, a timer), cancelled with the relay;
- `as_tap()`: a filter that only copies the bytes (a mirror) says so, and
  when it is a connection's only filter on plain TCP, the socket relay runs
  it instead (relay.py's `Tap`, connection.py).

Every hook has a default that does nothing, so a filter overrides only what
it changes. A direction with no filter is a plain pump (streams.py).

The makers (makers.py: faults here, bandwidth limits in rates.py, mirroring
in mirror.py) decide, once per connection right after it connected, which
filters each direction gets; the plain path pays one check per maker (most
often a None attribute) and keeps the socket relay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio
from mypy_extensions import mypyc_attr

from trioanubis.proxy.faults import CLEAN, DirectionPlan, count, draw

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection, EndState
    from trioanubis.proxy.relay import Tap

# A bandwidth limit is paced in steps of 1/20 s: smooth enough for a client to
# see a steady rate, few enough wake-ups to cost nothing.
PACING_STEPS: Final = 20
# Tiny slices without a delay yield to other tasks this often.
SLICES_PER_CHECKPOINT: Final = 64

Filters = tuple["Filter", ...]


@mypyc_attr(allow_interpreted_subclasses=True)  # the testing kit's toxics are not compiled (setup.py)
class Filter:
    """One effect on one direction of a stream-relayed connection (see the module docstring)."""

    __slots__ = ()

    def start(self, conn: Connection, nursery: trio.Nursery) -> None:
        """Start what the filter runs beside the relay, in its nursery (nothing, as a rule)."""

    def on_read(self, data: bytes) -> bytes | None:
        return data

    def delay(self) -> float:
        return 0.0

    def piece(self, size: int, delivered: int) -> int:
        return size

    async def before_piece(self, size: int) -> None:
        """Wait until `size` more bytes may leave."""

    async def after_piece(self, delivered: int, more: bool) -> EndState | None:
        """`delivered` bytes went this way so far (`more` of the chunk to come); an end state cuts here."""
        return None

    async def on_eof(self) -> bool:
        """The source sent EOF (after every byte before it left): whether to pass it on."""
        return True

    def as_tap(self) -> Tap | None:
        """This filter as a `Tap` (relay.py) when it only copies what passes (a mirror): the socket
        relay can then run it in place of the stream relay. None, as a rule."""
        return None

    @property
    def delays(self) -> bool:
        """Whether `delay` may hold chunks (the direction then gets a reader and a sender)."""
        return False


class TokenBucket:
    """A rate in bytes per second, paced in steps; shared by whoever holds it (a client's connections)."""

    __slots__ = ("next_send", "rate")

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.next_send = 0.0  # the bucket's next free moment

    @property
    def step(self) -> int:
        return max(1, self.rate // PACING_STEPS)

    async def take(self, size: int) -> None:
        now = trio.current_time()
        if self.next_send > now:
            await trio.sleep_until(self.next_send)
        self.next_send = max(self.next_send, now) + size / self.rate


class FaultFilter(Filter):
    """A direction's injected faults (faults.py's `DirectionPlan`)."""

    __slots__ = ("bucket", "conn", "pieces", "plan")

    def __init__(self, plan: DirectionPlan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.bucket = TokenBucket(plan.bandwidth) if plan.bandwidth else None
        self.pieces = 0

    def on_read(self, data: bytes) -> bytes | None:
        return None if self.plan.blackhole else data

    @property
    def delays(self) -> bool:
        return bool(self.plan.latency or self.plan.jitter)

    def delay(self) -> float:
        return self.plan.delay() if self.plan.latency else 0.0

    def piece(self, size: int, delivered: int) -> int:
        plan = self.plan
        if plan.slice:
            size = min(size, plan.slice)
        if self.bucket is not None:
            size = min(size, self.bucket.step)
        if plan.limit:
            size = min(size, plan.limit - delivered)
        return size

    async def before_piece(self, size: int) -> None:
        if self.bucket is not None:
            await self.bucket.take(size)

    async def after_piece(self, delivered: int, more: bool) -> EndState | None:
        plan = self.plan
        if plan.limit and delivered >= plan.limit:
            end = plan.cut
            if self.conn.picked is not None:
                count(self.conn.picked, "reset_after" if end == "fault_reset" else "close_after")
            return end  # type: ignore[return-value]  # "fault_reset" or "fault_close"
        if plan.slice and more:
            self.pieces += 1
            if plan.slice_delay:
                await trio.sleep(plan.slice_delay)
            elif self.pieces % SLICES_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
        return None

    async def on_eof(self) -> bool:
        return not self.plan.blackhole


def fault_filters(conn: Connection) -> tuple[Filters, Filters] | None:
    """The faults this connection drew from its server's table, as filters (None: unfaulted)."""
    server = conn.picked
    if server is None or server.faults is None:
        return None
    plan = draw(server.faults, server)
    if plan is None:
        return None
    up = (FaultFilter(plan.upstream, conn),) if plan.upstream != CLEAN else ()
    down = (FaultFilter(plan.downstream, conn),) if plan.downstream != CLEAN else ()
    return up, down


def any_delays(filters: Sequence[Filter]) -> bool:
    return any(f.delays for f in filters)
