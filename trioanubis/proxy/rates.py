"""Bandwidth limits: bytes per second per connection and per client, as filters of the stream relay.

Theory of operation: a pool's `upload_rate` / `download_rate` (and its
listener's: where both set one, the tighter applies) limit each connection
on its own; `upload_rate_per_client` / `download_rate_per_client` limit all
of one client's open connections to the pool together, one budget shared
between them (budgets.py: token buckets with a burst of half a second,
kept in a bounded table per pool). Upload is client → server, download
server → client.

`rate_filters` is a maker (makers.py): once per connection, right after it
connected, it reads six numbers from the configs and returns None when all
are 0, so a connection with no limit keeps the socket relay and splice. A
limited direction gets a `RateFilter`: it cuts what it sends into pieces of
1/20 s of the tightest rate (`piece`) and, before each piece, takes it from
the connection's bucket and the client's (`before_piece`) and waits as long
as the emptier one asks. The stream relay's bounded FIFO then pushes back on
the sender (TCP backpressure): a limited direction holds at most its 64 KiB.

A connection holds its client's budget from the moment its relay starts
(`ClientLease.start`, a task of its own in the relay's nursery) until the
relay ends, however it ends (the task's `finally`), so the table never keeps
a budget for a connection that has gone. A connection keeps the limits it
started with; a reload's new rates apply to connections that start after it
(a changed per-client rate starts a new table: old connections give their
budgets back to the old one). With workers, each process keeps its own
table: a client's connections that land in two workers have a budget in each.

Per pool (`PoolRates`, for /stats and /metrics): limited connections, bytes
through a limit and seconds waited, each way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, final

import trio

from trioanubis.pool import PerPool, Pool
from trioanubis.proxy.budgets import Bucket, Budget, ClientBudgets
from trioanubis.proxy.filters import PACING_STEPS, Filter, Filters

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection

UP: Final = 0  # index of the upload (client → server) counters
DOWN: Final = 1
DIRECTIONS: Final = ("upload", "download")
KEYS: Final = ("upload_rate", "download_rate", "upload_rate_per_client", "download_rate_per_client")
_HOLD_TASK_NAME: Final = "trioanubis.rates.client_budget"


@final
class PoolRates:
    """What one pool's bandwidth limits did, and its per-client budgets."""

    __slots__ = ("budgets", "bytes", "connections", "waited")

    def __init__(self) -> None:
        self.connections = 0  # connections that got a limit
        self.bytes = [0, 0]  # through a limit: upload, download
        self.waited = [0.0, 0.0]  # seconds waited for a limit: upload, download
        self.budgets: ClientBudgets | None = None  # the per-client budgets, for the rates now in the config

    def budgets_for(self, up: int, down: int) -> ClientBudgets | None:
        """The table for these per-client rates (a new one when a reload changed them; None: no rates)."""
        if not up and not down:
            self.budgets = None
        elif self.budgets is None or self.budgets.rates != (up, down):
            self.budgets = ClientBudgets(up, down)
        return self.budgets


state_of: Final = PerPool(PoolRates)  # per pool, counts kept across reloads


def tighter(a: int, b: int) -> int:
    """The tighter of two limits, 0 meaning none."""
    return min(a, b) if a and b else a or b


@final
class ClientLease:
    """A connection's share of its client's budget: taken when its relay starts, given back when it ends."""

    __slots__ = ("budget", "budgets", "client")

    def __init__(self, budgets: ClientBudgets, client: str) -> None:
        self.budgets = budgets
        self.client = client
        self.budget: Budget | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Take the budget (once, whichever direction starts first) and hold it in a task of the relay's."""
        if self.budget is None:
            self.budget = self.budgets.acquire(self.client, trio.current_time())
            nursery.start_soon(self._hold, name=_HOLD_TASK_NAME)

    async def _hold(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            assert self.budget is not None
            self.budgets.release(self.budget, trio.current_time())


@final
class RateFilter(Filter):
    """One direction's limits: its own bucket, its client's, or both."""

    __slots__ = ("bucket", "index", "lease", "state", "step")

    def __init__(self, index: int, rate: int, lease: ClientLease | None, shared: int,
                 state: PoolRates) -> None:  # fmt: skip
        self.index = index  # UP or DOWN
        self.bucket = Bucket(rate, trio.current_time()) if rate else None
        self.lease = lease if shared else None
        self.state = state
        self.step = max(1, min(r for r in (rate, shared) if r) // PACING_STEPS)

    def start(self, conn: Connection, nursery: trio.Nursery) -> None:
        if self.lease is not None:
            self.lease.start(nursery)

    def piece(self, size: int, delivered: int) -> int:
        return min(size, self.step)

    async def before_piece(self, size: int) -> None:
        now = trio.current_time()
        wait = self.bucket.take(size, now) if self.bucket is not None else 0.0
        if self.lease is not None:
            budget = self.lease.budget
            assert budget is not None  # taken in start, before any piece
            shared = budget.up if self.index == UP else budget.down
            assert shared is not None
            wait = max(wait, shared.take(size, now))
        state = self.state
        state.bytes[self.index] += size
        if wait > 0:
            state.waited[self.index] += wait
            await trio.sleep(wait)


def rate_filters(conn: Connection) -> tuple[Filters, Filters] | None:
    """The maker (makers.py): this connection's limits as filters, or None when it has none."""
    pool = conn.pool
    assert pool is not None
    listener = conn.origin.config
    if not (pool.rate_limited or listener.upload_rate or listener.download_rate):
        return None
    config = pool.config
    state = state_of(pool)
    state.connections += 1
    up_shared, down_shared = config.upload_rate_per_client, config.download_rate_per_client
    budgets = state.budgets_for(up_shared, down_shared)
    lease = ClientLease(budgets, str(conn.peer[0])) if budgets is not None else None
    up = tighter(config.upload_rate, listener.upload_rate)
    down = tighter(config.download_rate, listener.download_rate)
    return _direction(UP, up, lease, up_shared, state), _direction(DOWN, down, lease, down_shared, state)


def _direction(index: int, rate: int, lease: ClientLease | None, shared: int, state: PoolRates) -> Filters:
    return (RateFilter(index, rate, lease, shared, state),) if rate or shared else ()


# ------------------------------------------------------------ what the operator sees


def show_rate(rate: int) -> str:
    """A rate as the config would write it: "1MB/s", "512KiB/s", "1500B/s"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
                        ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):  # fmt: skip
        if rate >= scale and rate % scale == 0:
            return f"{rate // scale}{unit}/s"
    return f"{rate}B/s"


def shown(pool: Pool) -> PoolRates | None:
    """What /stats and /metrics show of a pool's limits (made for them, never kept), or None."""
    state = state_of.get(pool)
    if state is None and any(getattr(pool.config, key) for key in KEYS):
        return PoolRates()
    return state


def stats(pool: Pool) -> dict[str, Any]:
    """A pool's bandwidth limits for /stats; nothing when it has none and never had any."""
    state = shown(pool)
    if state is None:
        return {}
    limits = {key: show_rate(getattr(pool.config, key)) for key in KEYS if getattr(pool.config, key)}
    budgets = state.budgets
    return {"bandwidth": {
        **limits,
        "limited_connections": state.connections,
        "bytes": dict(zip(DIRECTIONS, state.bytes, strict=True)),
        "waited_seconds": {way: round(s, 3) for way, s in zip(DIRECTIONS, state.waited, strict=True)},
        **({"tracked_clients": len(budgets)} if budgets is not None else {}),
    }}  # fmt: skip
