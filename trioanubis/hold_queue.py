"""The line of clients a pool holds while no server can take them (part of the live view).

Theory of operation: a pool with `queue_timeout > 0` keeps its held clients
in a `HoldQueue`, in accept order: each connection took a number when it was
accepted (`seq`), and that number, not the moment it reached the line, is its
place, so a client that spent longer in its opening (a TLS handshake, a PROXY
header, a first connect attempt) does not lose its turn to one accepted after
it. The data path's `proxy/hold.py` puts clients in (`join`) and takes them
out (`leave`).

Only the head of the line is awake to try: the pool pokes it (`poke`) when
anything may let it connect (a server came up, a connection ended and freed
a slot, weights changed), and it hands the turn on when it leaves. A
newcomer accepted before the head becomes the head. When the line is full
(`max_queued`), the newest arrival is refused: a newcomer accepted after
everyone held is turned away (`join` is False), and one accepted before the
newest held client takes that client's place, which is told to leave
(`Ticket.evicted`). Removing the pool (`shut`) tells every held client to go.

The pool's health checks sleep through `pause`, which is cut short when the
first client is held and shortened to `FAST_PROBE` while any is, so a server
that comes back is used within about `FAST_PROBE`.
"""

from __future__ import annotations

import bisect
from typing import Final, Protocol, final

import trio

# How often health checks probe while clients are held: a server that comes
# back is used within this long (the 100 ms).
FAST_PROBE: Final = 0.1


class Waiter(Protocol):
    """A held client, as the line sees it (lifecycle.py's `Connection`): its accept order."""

    @property
    def seq(self) -> int: ...


@final
class Ticket:
    """One held client's place in line."""

    __slots__ = ("evicted", "seq", "turn")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.turn = trio.Event()  # set when it is the head and something may let it connect
        self.evicted = False  # the line was full and it was the newest: it must leave


@final
class HoldQueue:
    """The line of held clients of one pool, in accept order, and its counters."""

    def __init__(self) -> None:
        self._line: list[Ticket] = []  # by seq
        self._tickets: dict[Waiter, Ticket] = {}
        self._busy = trio.lowlevel.ParkingLot()  # health checks waiting for the first held client
        self.closed = False  # the pool was removed: nobody waits any more
        self.held = 0  # clients that were ever held
        self.served = 0  # held clients that got a server
        self.timeouts = 0  # closed after queue_timeout
        self.full = 0  # closed at once, or put out, because max_queued were held

    def __len__(self) -> int:
        return len(self._line)

    def join(self, waiter: Waiter, capacity: int) -> bool:
        """Put `waiter` in line by accept order; False (counted) when the line is full and it is newest."""
        line = self._line
        if len(line) >= capacity:
            if not line or line[-1].seq < waiter.seq:
                self.full += 1
                return False
            newest = line.pop()
            newest.evicted = True
            newest.turn.set()
            self.full += 1
        ticket = self._tickets[waiter] = Ticket(waiter.seq)
        bisect.insort(line, ticket, key=_seq)
        self.held += 1
        if line[0] is ticket:
            ticket.turn.set()
            self._busy.unpark_all()  # probe fast from now on
        return True

    def ticket(self, waiter: Waiter) -> Ticket:
        return self._tickets[waiter]

    def is_head(self, ticket: Ticket) -> bool:
        return bool(self._line) and self._line[0] is ticket

    def leave(self, waiter: Waiter) -> None:
        """Take `waiter` out of line (idempotent); the next client gets its turn if it was the head."""
        ticket = self._tickets.pop(waiter, None)
        if ticket is None:
            return
        line = self._line
        index = bisect.bisect_left(line, ticket.seq, key=_seq)
        if index < len(line) and line[index] is ticket:
            del line[index]
            if index == 0:
                self.poke()

    def poke(self) -> None:
        """Something may let the head connect now (a server came up, a slot was freed): wake it."""
        if self._line:
            self._line[0].turn.set()

    def shut(self) -> None:
        """The pool is gone: wake every held client, to leave."""
        self.closed = True
        for ticket in self._line:
            ticket.turn.set()

    async def pause(self, seconds: float) -> None:
        """A health check's sleep: `FAST_PROBE` while clients are held, cut short when one is."""
        if self._line:
            await trio.sleep(FAST_PROBE)
            return
        with trio.move_on_after(seconds):
            await self._busy.park()


def _seq(ticket: Ticket) -> int:
    return ticket.seq
