"""Bandwidth budgets: a token bucket, and a bounded table of them per client. Pure.

Theory of operation: a bandwidth limit (rates.py) is a `Bucket` of `rate`
bytes per second that holds at most `burst`, half a second of its rate
(`BURST_SECONDS`), and starts full: a connection that was quiet may send
half a second's worth at once, never more. `take(size, now)` takes `size`
bytes' worth at once and answers how long the taker must wait before it
sends them (0 when the bucket held enough). The bucket may go into debt, so
takers that share one (a client's connections) queue behind each other's
debts in the order they took, and what passes through it in any span of T
seconds stays within rate × T + burst, however many take from it. It counts
what went through (`taken`) and the waits it asked for (`waited`), which is
how a test sees a budget shared without timing anything.

`ClientBudgets` keeps one `Budget` (an upload and a download bucket) per
client address for one pool, shared by all that client's open connections
(`acquire` counts a user, `release` gives it back). Its memory is bounded
the way `ClientTable` (clients.py) bounds connection counts, whatever
addresses PROXY headers may name: at most `capacity` clients. A client with
open connections is kept; one without is kept, least recently released
first, only until its buckets are full again (a full bucket is the same as
no entry), so a client cannot win a fresh burst by reconnecting. When the
table is full the oldest such idle entry is forgotten (`evicted`); when
every entry has open connections a new client gets a budget of its own,
outside the table (`untracked`): under a flood from more addresses than
`capacity`, per-client budgets cannot hold anyway, and the table's size does.

Nothing here reads a clock or does I/O: callers pass `now` (Trio's clock).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, final

from trioanubis.proxy.clients import MAX_TRACKED_CLIENTS

# The most a bucket holds: half a second of its rate. Enough for a request and its answer to pass
# a quiet connection unslowed, too little for reconnecting to beat the rate.
BURST_SECONDS: Final = 0.5


@final
class Bucket:
    """`rate` bytes per second, at most `burst` held, starting full (see the module docstring)."""

    __slots__ = ("burst", "rate", "stamp", "taken", "tokens", "waited")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.burst = rate * BURST_SECONDS
        self.tokens = self.burst  # negative: a debt the next takers wait for
        self.stamp = now  # when `tokens` was last brought up to date
        self.taken = 0  # bytes taken so far
        self.waited = 0.0  # seconds of waiting asked of the takers so far

    def take(self, size: int, now: float) -> float:
        """Take `size` bytes' worth now; how long to wait before sending them."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - size
        self.tokens, self.stamp = tokens, now
        self.taken += size
        if tokens >= 0:
            return 0.0
        wait = -tokens / self.rate
        self.waited += wait
        return wait

    def full_at(self) -> float:
        """When the bucket is full again if nobody takes meanwhile."""
        return self.stamp + max(0.0, self.burst - self.tokens) / self.rate


@final
class Budget:
    """One client's buckets (None: that direction has no per-client limit) and its open connections."""

    __slots__ = ("client", "down", "up", "users")

    def __init__(self, client: str, up: Bucket | None, down: Bucket | None) -> None:
        self.client = client
        self.up = up
        self.down = down
        self.users = 0

    def full_at(self) -> float:
        return max((b.full_at() for b in (self.up, self.down) if b is not None), default=0.0)


@final
class ClientBudgets:
    """Per-client budgets of one pool, at most `capacity` clients (see the module docstring)."""

    def __init__(self, up: int, down: int, capacity: int = MAX_TRACKED_CLIENTS) -> None:
        self.rates = (up, down)  # bytes per second; 0: no per-client limit that way
        self.capacity = capacity
        self._open: dict[str, Budget] = {}  # clients with open connections
        self._idle: OrderedDict[str, Budget] = OrderedDict()  # released, not full again; oldest first
        self.evicted = 0  # idle budgets forgotten early because the table was full
        self.untracked = 0  # budgets given outside the table: every entry had open connections

    def __len__(self) -> int:
        return len(self._open) + len(self._idle)

    @property
    def active(self) -> dict[str, int]:
        """Open connections per client, for the clients that have any (a copy)."""
        return {client: budget.users for client, budget in self._open.items()}

    def acquire(self, client: str, now: float) -> Budget:
        """The budget `client`'s new connection shares with its others (one more user of it)."""
        budget = self._open.get(client)
        if budget is None:
            budget = self._idle.pop(client, None)
            if budget is None:
                budget = self._new(client, now)
                if not self._make_room(now):
                    self.untracked += 1
                    budget.users += 1
                    return budget  # outside the table: nobody shares it
            self._open[client] = budget
        budget.users += 1
        return budget

    def release(self, budget: Budget, now: float) -> None:
        """A connection that `acquire`d `budget` has ended."""
        budget.users -= 1
        if budget.users or self._open.get(budget.client) is not budget:
            return
        del self._open[budget.client]
        self._forget_full(now)
        if budget.full_at() > now:
            self._idle[budget.client] = budget  # its debt or spent burst still counts

    def _new(self, client: str, now: float) -> Budget:
        up, down = self.rates
        return Budget(client, Bucket(up, now) if up else None, Bucket(down, now) if down else None)

    def _forget_full(self, now: float) -> None:
        """Drop idle budgets that are full again, from the oldest (released first, so full first, nearly)."""
        idle = self._idle
        while idle and next(iter(idle.values())).full_at() <= now:
            idle.popitem(last=False)

    def _make_room(self, now: float) -> bool:
        """Room for one more client: drop budgets full again, else the oldest idle one; False if none idle."""
        self._forget_full(now)
        idle = self._idle
        if len(self) < self.capacity:
            return True
        if not idle:
            return False
        idle.popitem(last=False)
        self.evicted += 1
        return True
