"""The line of clients a pool holds while no server can take them (part of the live view).

Theory of operation: a pool with `queue_timeout > 0` keeps its held clients
in a `HoldQueue`, in arrival order (the data path's `proxy/hold.py` puts
them there and takes them out). Only the head of the line is awake: `join`
gives the first client its turn at once, and `leave` by the head hands the
turn to the next. The pool's health checks sleep through `pause`, which is
cut short when the first client is held and shortened to `FAST_PROBE` while
any is, so a server that comes back is used within about `FAST_PROBE`.
"""

from __future__ import annotations

from collections import deque
from typing import Final, final

import trio

# How often health checks probe while clients are held: a server that comes
# back is used within this long (the 100 ms).
FAST_PROBE: Final = 0.1


@final
class Ticket:
    """One held client's place in line."""

    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = trio.Event()  # set when it becomes the head of the line


@final
class HoldQueue:
    """The line of held clients of one pool, and its counters."""

    def __init__(self) -> None:
        self._line: deque[Ticket] = deque()
        self._busy = trio.lowlevel.ParkingLot()  # health checks waiting for the first held client
        self.held = 0  # clients that were ever held
        self.served = 0  # held clients that got a server
        self.timeouts = 0  # closed after queue_timeout
        self.full = 0  # closed at once: max_queued were held already

    def __len__(self) -> int:
        return len(self._line)

    def join(self) -> Ticket:
        ticket = Ticket()
        self._line.append(ticket)
        self.held += 1
        if len(self._line) == 1:
            ticket.turn.set()
            self._busy.unpark_all()  # probe fast from now on
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """Take `ticket` out of line; the next client gets its turn if it was the head."""
        was_head = bool(self._line) and self._line[0] is ticket
        self._line.remove(ticket)
        if was_head and self._line:
            self._line[0].turn.set()

    async def pause(self, seconds: float) -> None:
        """A health check's sleep: `FAST_PROBE` while clients are held, cut short when one is."""
        if self._line:
            await trio.sleep(FAST_PROBE)
            return
        with trio.move_on_after(seconds):
            await self._busy.park()
