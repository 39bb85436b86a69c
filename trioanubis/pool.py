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

Priority groups (backup servers): the candidates are split by `priority` when
the state changes, and `candidates()` is the best (lowest) group that has any.
A pick asks that group's strategy first; only when it finds no usable server
(all full, or all tried by this connection's failover) does it fall through to
the next group. Each group has its own strategy instance, so a round robin's
cycle or a hash table is not rebuilt when picks alternate between groups.
Strategies stay pure: they never learn that groups exist. When a better group
comes back with slow start, it takes the share its best server's ramp allows
and the group that served until then keeps the rest (`_spill_rate`), so
traffic returns gradually instead of all at once; groups that ramp together
(a fresh start) keep their order.


One writer: a server's state (up, draining, removed, weights, priority,
limits, faults, resolved addresses) and the pool's membership change only
through a method of its pool, whoever reports it (health checks, discovery,
the spawner, a reload, an operator's command applied by control.py, a worker
following its supervisor's health view), so each change is logged once and
the candidates are rebuilt. A server added at runtime has `source` "admin"
until a reload's file names it (`take_over`). Counters the data path bumps (`active`,
`total`, bytes) go through `reserve`, `acquire` and `release` too.

Invariants: `active` counts a connection from the moment it is picked, while
it connects, and while it relays: `reserve` raises it in the same step as the
pick (no checkpoint in between, so a burst of connects in flight cannot slip
past `max_connections`, which is a hard cap like HAProxy's `maxconn`), and
`release` lowers it when the connect failed or the connection ended; the
connection gives its slot back whatever way it ends (proxy/lifecycle.py).
`acquire` only counts a connection that reached its server (`total`). A
server removed from the config stays in `retired` until its last connection
(or connect) ends.

The wake-up contract with held clients (hold_queue.py): whatever may let a
held client connect pokes the head of the pool's line, and only it: a state
or weight change (`changed`) and a freed slot (`release`). Nothing else is
woken per connection: `wait_changed` parkers (health checks, the spawner)
wake for changes only.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, TypeVar, cast, final

import trio

from trioanubis.config import Address, FaultConfig, PoolConfig, ServerConfig
from trioanubis.hold_queue import HoldQueue
from trioanubis.strategies import Strategy, make_strategy

if TYPE_CHECKING:
    from trioanubis.health.agent_state import AgentStatus

log = logging.getLogger("trioanubis.pool")

# Weight of the newest latency sample in the moving average: 0.3 follows a
# server that turned slow within a handful of requests without letting one
# outlier swing the choice.
EWMA_ALPHA: Final = 0.3
# Server.source of a server that an etcd key gives (fleet/servers.py adds, changes and removes those).
ETCD_SOURCE: Final = "etcd"


# Connection duration buckets (seconds): from a quick request/response to the
# default idle timeout, roughly ×2.5 apart like Prometheus' defaults. (Not `Final`: mypyc turns a
# final tuple of floats into a C struct whose "not set" check misfires, setup.py.)
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
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
        i = bisect_left(self.bounds, value)  # the first bound ≥ value (one C call, every connection)
        if i < len(self.counts):
            self.counts[i] += 1

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
        "active", "address", "agent", "bytes_in", "bytes_out", "checks_failed", "checks_passed",
        "checks_skipped", "config_faults", "config_weight", "connect_failures", "consecutive_failures",
        "draining", "effective_weight", "ewma", "fault_override", "faults", "faults_applied", "healthy",
        "last_check", "max_connections", "name", "priority", "process_down", "removed", "send_proxy",
        "sockaddrs", "source", "total", "weight",
    )  # fmt: skip

    def __init__(self, config: ServerConfig, *, healthy: bool = True, source: str = "",
                 sockaddrs: list[tuple[int, tuple[object, ...]]] | None = None) -> None:  # fmt: skip
        self.name = config.name
        self.address: Address = config.address
        self.weight = config.weight
        self.config_weight = config.weight  # what the config file says; `weight` may be the admin's since
        self.max_connections = config.max_connections
        self.send_proxy = config.send_proxy  # "": the pool's
        self.priority = config.priority
        self.source = source  # "" for the file's servers; discovery's entry, "spawn" or "admin" (runtime)
        self.healthy = healthy
        self.draining = False
        self.removed = False
        # Its process is known not to run (a spawned replica between an exit and its restart): what
        # answers on its port is not it, so no check brings it up meanwhile (health/checker.py).
        self.process_down = False
        self.effective_weight = float(config.weight)
        self.sockaddrs: list[tuple[int, tuple[object, ...]]] = sockaddrs or []  # (family, sockaddr)
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
        self.agent: AgentStatus | None = None  # its agent check's last word (health/agent_state.py)

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


@dataclass(frozen=True, slots=True)
class Group:
    """The candidates of one priority, and the strategy instance that picks among them."""

    priority: int
    servers: tuple[Server, ...]
    strategy: Strategy


@final
class Pool:
    """The shared live view of one pool's servers."""

    def __init__(self, config: PoolConfig, *, initially_healthy: bool | None = None) -> None:
        self.config = config  # and `rate_limited`
        self.name = config.name
        healthy = config.health.check == "none" if initially_healthy is None else initially_healthy
        self.servers: list[Server] = [Server(s, healthy=healthy) for s in config.servers]
        for server in self.servers:
            self._resolve_faults(server)
        self.retired: list[Server] = []  # removed, still carrying connections
        self._strategy: Strategy = make_strategy(config.strategy, config.balance_factor)
        self._strategies: dict[int, Strategy] = {}  # per priority group
        self.durations = Histogram(DURATION_BUCKETS)
        self.no_server = 0  # clients closed because no server could take them
        self.all_full = 0  # of those, the ones where every server was at max_connections
        self._has_limits = any(s.max_connections for s in self.servers)
        self._lot = trio.lowlevel.ParkingLot()  # waiting for a change
        self.groups: tuple[Group, ...] = ()  # usable groups, best first
        self.serving_priority: int | None = None  # the best group's priority
        self._spill_rate = 0.0  # share of picks the next group keeps while the best ramps up
        self._spill = 0.0
        self.held = HoldQueue()  # clients waiting for a server (queue_timeout)
        # The live toxics of a proxy the testing kit runs (trioanubis/testing/toxics.py); None as a rule.
        self.toxics: object = None
        self.version = 0  # counts changed(): whoever keeps something derived can tell it is stale
        # Told about each passive ejection (a worker passes it to its supervisor).
        self.on_eject: Callable[[Server, str], None] | None = None
        self.kept: dict[object, object] = {}  # what features keep for this pool (PerPool)
        self._group()

    @property
    def config(self) -> PoolConfig:
        return self._config

    @config.setter
    def config(self, config: PoolConfig) -> None:
        """The pool's config, at start and at each reload."""
        self._config = config
        # Whether its connections' bandwidth is limited: proxy/rates.py asks this first, a native read
        # in the compiled build where the config's four fields are four lookups by name.
        self.rate_limited = bool(config.upload_rate or config.download_rate or config.upload_rate_per_client
                                 or config.download_rate_per_client)  # fmt: skip

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        """Replace the strategy (reload): every group gets a fresh instance of it."""
        self._strategy = strategy
        self._strategies.clear()
        self._group()

    # ---------------------------------------------------------------- picking

    def candidates(self) -> tuple[Server, ...]:
        """The serving group: the best priority's servers that may take new connections,
        ignoring per-connection limits (empty when no server of any priority may)."""
        return self.groups[0].servers if self.groups else ()

    def pick(self, client_key: bytes, exclude: Collection[Server] = ()) -> Server | None:
        """Ask the strategy for a server that is available, has capacity and is not excluded.

        The serving group is asked first; the next group only when that finds no usable
        server, or for its share of picks while the serving group ramps up (slow start).
        """
        groups = self.groups
        if not groups:
            return None
        usable: Callable[[Server], bool]
        if exclude:
            usable = lambda s: s not in exclude and s.has_capacity()  # noqa: E731
        elif self._has_limits:
            usable = _has_capacity
        else:
            usable = _no_limit
        if self._spill_rate and self._spill_now():
            groups = (groups[1], groups[0], *groups[2:])
        for group in groups:
            server = group.strategy.pick(group.servers, client_key, usable)
            if server is not None:
                return server
        return None

    def _spill_now(self) -> bool:
        """Whether this pick is one of the next group's share (evenly spread, no randomness)."""
        self._spill += self._spill_rate
        if self._spill >= 1.0:
            self._spill -= 1.0
            return True
        return False

    def changed(self) -> None:
        """Note that membership, state or weights changed: candidates are rebuilt."""
        self.version += 1
        self._has_limits = any(s.max_connections for s in self.servers)
        self._group()
        self._lot.unpark_all()
        self.held.poke()  # a held client may connect now

    def _group(self) -> None:
        """Split the servers that may take connections into priority groups, best first."""
        members: dict[int, list[Server]] = {}
        for s in self.servers:
            if s.healthy and not s.draining and not s.removed and s.effective_weight > 0:
                members.setdefault(s.priority, []).append(s)
        self.groups = tuple(
            Group(priority, tuple(members[priority]), self._strategy_for(priority))
            for priority in sorted(members)
        )
        serving = self.groups[0].priority if self.groups else None
        if serving is not None and serving != self.serving_priority:
            self._log_serving(serving)
        self.serving_priority = serving
        self._spill_rate = _ramp_share(self.groups)

    def _log_serving(self, serving: int) -> None:
        best = min(s.priority for s in self.servers)
        if serving != best:
            log.warning("pool %s: priority %d serves new connections (no server of priority %d "
                        "is usable)", self.name, serving, best)  # fmt: skip
        elif self.serving_priority is not None:
            log.info("pool %s: priority %d serves new connections again", self.name, serving)

    def _strategy_for(self, priority: int) -> Strategy:
        strategy = self._strategies.get(priority)
        if strategy is None:
            in_use = self._strategy in self._strategies.values()
            config = self.config
            strategy = make_strategy(config.strategy, config.balance_factor) if in_use else self._strategy
            self._strategies[priority] = strategy
        return strategy

    def set_priority(self, server: Server, priority: int) -> None:
        if server.priority != priority:
            server.priority = priority
            self.changed()

    async def wait_changed(self) -> None:
        """Sleep until the next `changed()` (membership, state or weights)."""
        await self._lot.park()

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
        if self.held:  # a freed slot may let the first held client connect (nothing to do as a rule)
            self.held.poke()

    def record_connect_success(self, server: Server, started: float, now: Callable[[], float]) -> None:
        """A connect begun at `started` (on the clock `now` reads) succeeded; the clock is read only
        when the connect time is least_time's sample."""
        server.consecutive_failures = 0
        if self.config.least_time == "connect":
            self.record_time(server, now() - started)

    def record_connect_failure(self, server: Server, reason: str) -> None:
        """Count a failed connect; `eject_after` in a row take the server out at once."""
        server.connect_failures += 1
        server.consecutive_failures += 1
        limit = self.config.eject_after
        if limit and server.consecutive_failures >= limit and server.healthy:
            self.mark_down(server, f"ejected after {server.consecutive_failures} failed connects "
                                   f"({reason})")  # fmt: skip
            if self.on_eject is not None:
                self.on_eject(server, reason)

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

    def set_addresses(self, server: Server, sockaddrs: list[tuple[int, tuple[object, ...]]]) -> None:
        """What `server`'s address resolved to (start-up, reload, discovery, the spawner, a health check)."""
        server.sockaddrs = sockaddrs

    def record_check(self, server: Server, ok: bool, reason: str) -> None:
        """Count one health check's verdict (the state change, if any, is `mark_up` / `mark_down`)."""
        if ok:
            server.checks_passed += 1
        else:
            server.checks_failed += 1
        server.last_check = reason if ok else f"failed: {reason}"

    def record_check_skipped(self, server: Server, reason: str) -> None:
        """A check that ran short on our side: no verdict about the server."""
        server.checks_skipped += 1
        server.last_check = f"skipped: {reason}"

    def configure_server(self, server: Server, config: ServerConfig) -> None:
        """A reload's word on a server it keeps: limits, PROXY version, priority; weight and faults when
        the file changed them (what the admin API set survives a reload of an unchanged file)."""
        server.max_connections = config.max_connections
        server.send_proxy = config.send_proxy
        if config.faults != server.config_faults:
            server.config_faults = config.faults
            self.set_faults(server, config.faults)
        if config.weight != server.config_weight:
            server.config_weight = config.weight
            self.set_weight(server, config.weight)
        self.set_priority(server, config.priority)
        self._has_limits = any(s.max_connections for s in self.servers)

    def take_over(self, server: Server, config: ServerConfig) -> None:
        """A reload's file now names `server`, which was added at runtime: it is the file's from now on,
        with the file's weight, faults, limits and priority (a drain stays, as it does through reloads)."""
        server.source = ""
        server.config_weight, server.config_faults = config.weight, config.faults
        server.max_connections = config.max_connections
        server.send_proxy = config.send_proxy
        server.priority = config.priority
        self.set_faults(server, config.faults)
        self.set_weight(server, config.weight)  # rebuilds the candidates
        log.info("pool %s: server %s, added at runtime, is the config file's now", self.name, server.name)

    def follow(self, server: Server, healthy: bool, draining: bool, weight: int, effective: float) -> bool:
        """Take a server's state as another process sees it (a worker, its supervisor); True if it changed.

        The caller calls `changed` once for a batch."""
        new = (healthy, draining, weight, effective)
        if new == (server.healthy, server.draining, server.weight, server.effective_weight):
            return False
        server.healthy, server.draining, server.weight, server.effective_weight = new
        return True

    def shut(self) -> None:
        """The pool was removed (a reload): clients it holds are told to leave."""
        self.held.shut()

    # ------------------------------------------------------------- agent checks

    def record_agent(self, server: Server, status: AgentStatus) -> None:
        """Keep what `server`'s agent last said (health/agent.py); /stats and /metrics show it.

        It changes no state: what the agent's words change goes through `set_draining`,
        `mark_down`/`mark_up` and `set_effective_weight`, each logged there.
        """
        server.agent = status

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


def _ramp_share(groups: tuple[Group, ...]) -> float:
    """The share of picks the second group keeps while the first ramps up (slow start).

    A group is as far up its ramp as its furthest server: one with a server at full
    weight was serving already. The second group keeps what it is ahead by, so a
    group that comes back to replace an established backup starts with 1/16 of the
    traffic, while groups that ramp together (a fresh start) keep their order.
    """
    if len(groups) < 2:
        return 0.0
    return max(0.0, _ramp(groups[1]) - _ramp(groups[0]))


def _ramp(group: Group) -> float:
    return max(min(1.0, s.effective_weight / s.weight) if s.weight else 1.0 for s in group.servers)


_Key = TypeVar("_Key", bound=Hashable)
_Wanted = TypeVar("_Wanted")


def diff_servers(
    current: Mapping[_Key, Server], wanted: Mapping[_Key, _Wanted]
) -> tuple[list[Server], list[tuple[Server, _Wanted]], list[_Wanted]]:
    """What makes `current` match `wanted`, keyed alike: (servers to remove, servers kept with
    what is wanted of them, what to add). Reload (a file's server list) and discovery (a DNS
    answer) both bring a pool's servers to a wanted list through this one comparison."""
    removed = [server for key, server in current.items() if key not in wanted]
    kept = [(current[key], want) for key, want in wanted.items() if key in current]
    added = [want for key, want in wanted.items() if key not in current]
    return removed, kept, added


_State = TypeVar("_State")


@final
class PerPool(Generic[_State]):
    """What a feature keeps per pool (mirror.py, rates.py), made at first use and kept for as long as
    the pool exists: a reload keeps a pool's object, so its state too."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], _State]) -> None:
        self._make = make

    def __call__(self, pool: Pool) -> _State:
        state = self.get(pool)
        if state is None:
            state = self._make()
            pool.kept[self] = state  # the pool keeps it: gone with the pool
        return state

    def get(self, pool: Pool) -> _State | None:
        """The pool's state if it has one yet, without making it."""
        return cast("_State | None", pool.kept.get(self))
