"""The live view of a pool: its servers, their state and their counters.

Theory of operation: a `Pool` owns a list of `Server` records. Health checks,
the admin API, discovery and the connection code report events to the pool
(`mark_up`, `mark_down`, `record_connect_failure`, …) and the pool is the only
place that changes a server's state, so every transition is logged exactly
once. Strategies never see the pool: they get `candidates()`, a tuple of the
servers that may take new connections (up, not draining, not removed, weight
> 0), rebuilt only after `changed()`, so a pick never filters the whole
list. Per-connection limits (`max_connections`) change with every connection,
so they are checked by the `usable` predicate the pool hands to the strategy.

Invariants: `active` counts a connection from the moment it is picked, while
it connects, and while it relays: `reserve` raises it in the same step as the
pick (no checkpoint in between, so a burst of connects in flight cannot slip
past `max_connections`, which is a hard cap like HAProxy's `maxconn`), and
`release` lowers it when the connect failed or the connection ended; the
connection code calls them in `try/finally`. `acquire` only counts a
connection that reached its server (`total`). A server removed from the config
stays in `retired` until its last connection (or connect) ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import Final, final

import trio

from trioanubis.config import Address, FaultConfig, PoolConfig, ServerConfig
from trioanubis.strategies import Strategy, make_strategy

log = logging.getLogger("trioanubis.pool")

# Weight of the newest latency sample in the moving average: 0.3 follows a
# server that turned slow within a handful of requests without letting one
# outlier swing the choice.
EWMA_ALPHA: Final = 0.3


# Connection duration buckets (seconds): from a quick request/response to the
# default idle timeout, roughly ×2.5 apart like Prometheus' defaults.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                           60.0, 300.0, 600.0)  # fmt: skip


@final
class Histogram:
    """Cumulative-bucket histogram in the shape Prometheus exposes."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # observations ≤ each bound (not cumulative)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        running, out = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@final
class Server:
    """One backend as the balancer currently sees it (mutated only through its Pool)."""

    __slots__ = (
        "active", "address", "bytes_in", "bytes_out", "checks_failed", "checks_passed", "checks_skipped",
        "config_faults", "connect_failures", "consecutive_failures", "draining", "effective_weight", "ewma",
        "fault_override", "faults", "faults_applied", "healthy", "last_check", "max_connections", "name",
        "removed", "send_proxy", "sockaddrs", "source", "total", "weight",
    )  # fmt: skip

    def __init__(self, config: ServerConfig, *, healthy: bool = True, source: str = "") -> None:
        self.name = config.name
        self.address: Address = config.address
        self.weight = config.weight
        self.max_connections = config.max_connections
        self.send_proxy = config.send_proxy  # "": the pool's
        self.source = source  # "" for static servers, the discovery name otherwise
        self.healthy = healthy
        self.draining = False
        self.removed = False
        self.effective_weight = float(config.weight)
        self.sockaddrs: list[tuple[int, tuple[object, ...]]] = []  # (family, sockaddr)
        self.active = 0
        self.total = 0
        self.bytes_in = 0  # client → server
        self.bytes_out = 0  # server → client
        self.connect_failures = 0
        self.consecutive_failures = 0
        self.checks_passed = 0
        self.checks_failed = 0
        self.checks_skipped = 0  # probes that ran short locally (descriptors, memory): no verdict
        self.ewma: float | None = None
        self.last_check = ""
        self.config_faults = config.faults  # what the config file gives this server (None: the pool's)
        self.fault_override = config.faults  # the same, or what the admin API set since
        self.faults: FaultConfig | None = None  # in effect for new connections; None: none (see Pool)
        self.faults_applied: dict[str, int] = {}  # fault name → times it acted (trioanubis.faults)

    @property
    def state(self) -> str:
        if self.removed or self.draining:
            return "draining"
        return "up" if self.healthy else "down"

    def has_capacity(self) -> bool:
        return self.max_connections == 0 or self.active < self.max_connections

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.address} {self.state}>"


def _has_capacity(server: Server) -> bool:
    return server.has_capacity()


@final
class Pool:
    """The shared live view of one pool's servers."""

    def __init__(self, config: PoolConfig, *, initially_healthy: bool | None = None) -> None:
        self.config = config
        self.name = config.name
        healthy = config.health.check == "none" if initially_healthy is None else initially_healthy
        self.servers: list[Server] = [Server(s, healthy=healthy) for s in config.servers]
        for server in self.servers:
            self._resolve_faults(server)
        self.retired: list[Server] = []  # removed, still carrying connections
        self.strategy: Strategy = make_strategy(config.strategy)
        self.durations = Histogram(DURATION_BUCKETS)
        self.no_server = 0  # clients closed because no server could take them
        self.all_full = 0  # of those, the ones where every server was at max_connections
        self._candidates: tuple[Server, ...] | None = None
        self._has_limits = any(s.max_connections for s in self.servers)
        self._lot = trio.lowlevel.ParkingLot()  # waiting for a change
        self._released = trio.lowlevel.ParkingLot()  # waiting for a connection to end

    # ---------------------------------------------------------------- picking

    def candidates(self) -> tuple[Server, ...]:
        """Servers that may take new connections, ignoring per-connection limits."""
        if self._candidates is None:
            self._candidates = tuple(
                s
                for s in self.servers
                if s.healthy and not s.draining and not s.removed and s.effective_weight > 0
            )
        return self._candidates

    def pick(self, client_key: bytes, exclude: Collection[Server] = ()) -> Server | None:
        """Ask the strategy for a server that is available, has capacity and is not excluded."""
        candidates = self.candidates()
        if not candidates:
            return None
        usable: Callable[[Server], bool]
        if exclude:
            usable = lambda s: s not in exclude and s.has_capacity()  # noqa: E731
        elif self._has_limits:
            usable = _has_capacity
        else:
            usable = _no_limit
        return self.strategy.pick(candidates, client_key, usable)

    def changed(self) -> None:
        """Note that membership, state or weights changed: candidates are rebuilt."""
        self._candidates = None
        self._has_limits = any(s.max_connections for s in self.servers)
        self._lot.unpark_all()

    async def wait_changed(self) -> None:
        """Sleep until the next `changed()` (membership, state or weights)."""
        await self._lot.park()

    async def wait_released(self) -> None:
        """Sleep until a connection to one of the pool's servers ends."""
        await self._released.park()

    # ------------------------------------------------------------ accounting

    def reserve(self, server: Server) -> None:
        """Count a connection to `server` from its pick on, so its connect counts against the limit."""
        server.active += 1

    def acquire(self, server: Server) -> None:
        """A reserved connection reached `server`."""
        server.total += 1

    def release(self, server: Server, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """A reserved connection ended (or its connect failed): its slot is free again."""
        server.active -= 1
        server.bytes_in += bytes_in
        server.bytes_out += bytes_out
        if server.removed and server.active == 0 and server in self.retired:
            self.retired.remove(server)
            log.info("pool %s: server %s removed after its last connection", self.name, server.name)
        if self._released:  # nothing waits, as a rule: no wake-up per connection
            self._released.unpark_all()

    def record_connect_success(self, server: Server, connect_time: float) -> None:
        server.consecutive_failures = 0
        if self.config.least_time == "connect":
            self.record_time(server, connect_time)

    def record_connect_failure(self, server: Server, reason: str) -> None:
        """Count a failed connect; `eject_after` in a row take the server out at once."""
        server.connect_failures += 1
        server.consecutive_failures += 1
        limit = self.config.eject_after
        if limit and server.consecutive_failures >= limit and server.healthy:
            self.mark_down(server, f"ejected after {server.consecutive_failures} failed connects "
                                   f"({reason})")  # fmt: skip

    def record_time(self, server: Server, seconds: float) -> None:
        """Fold one latency sample into the server's moving average (least_time)."""
        if server.ewma is None:
            server.ewma = seconds
        else:
            server.ewma += EWMA_ALPHA * (seconds - server.ewma)

    # ------------------------------------------------------------- state

    def mark_up(self, server: Server, reason: str = "") -> None:
        if server.healthy:
            return
        server.healthy = True
        server.consecutive_failures = 0
        log.info("pool %s: server %s is up%s", self.name, server.name,
                 f" ({reason})" if reason else "")  # fmt: skip
        self.changed()

    def mark_down(self, server: Server, reason: str, *, first_check: bool = False) -> None:
        """Take `server` out; `first_check` logs it even though servers start down."""
        if not server.healthy and not first_check:
            return
        server.healthy = False
        log.warning("pool %s: server %s is down (%s)", self.name, server.name, reason)
        self.changed()

    def set_draining(self, server: Server, draining: bool) -> None:
        if server.draining != draining:
            server.draining = draining
            log.info("pool %s: server %s %s", self.name, server.name,
                     "drains (no new connections)" if draining else "is enabled")  # fmt: skip
            self.changed()

    def set_weight(self, server: Server, weight: int) -> None:
        server.weight = weight
        server.effective_weight = float(weight)
        self.changed()

    def set_effective_weight(self, server: Server, weight: float) -> None:
        if server.effective_weight != weight:
            server.effective_weight = weight
            self.changed()

    def find(self, key: str) -> Server | None:
        """A server by name or by its address as written ("host:port")."""
        for server in self.servers:
            if key in (server.name, str(server.address)):
                return server
        return None

    def add(self, servers: Iterable[Server]) -> None:
        added = list(servers)
        for server in added:
            self._resolve_faults(server)
        self.servers.extend(added)
        self.changed()

    def set_faults(self, server: Server, faults: FaultConfig | None) -> None:
        """Replace `server`'s own faults (None: follow the pool's); new connections only."""
        server.fault_override = faults
        self._resolve_faults(server)

    def refresh_faults(self) -> None:
        """Recompute every server's faults after the pool's config changed (a reload)."""
        for server in self.servers:
            self._resolve_faults(server)

    def _resolve_faults(self, server: Server) -> None:
        # One attribute read per connection on the data path: None unless a fault is set.
        own = server.fault_override if server.fault_override is not None else self.config.faults
        server.faults = own if own is not None and own.active else None

    def remove(self, server: Server) -> None:
        """Stop new connections to `server`; it leaves for good once idle."""
        self.servers.remove(server)
        server.removed = True
        if server.active:
            self.retired.append(server)
        self.changed()

    @property
    def active(self) -> int:
        return sum(s.active for s in self.servers) + sum(s.active for s in self.retired)


def _no_limit(server: Server) -> bool:
    return True
