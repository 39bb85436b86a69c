"""Who a client is allowed to be: address sets, per-client limits, once-a-minute logging. Pure.

Theory of operation: a listener's admission (admission.py) asks three
questions of a client address, as accept() or a PROXY header reported it:

- `NetworkSet`: is it in these CIDRs? The networks are merged into sorted
  integer ranges per family, so a lookup is one `inet_pton` and one bisect,
  whatever the list's length. An IPv4-mapped IPv6 address (a dual-stack
  listener's IPv4 client) is matched as the IPv4 address it carries.
- `ClientTable`: may it open one more connection? It counts each client's
  open connections (`max_connections_per_client`) and keeps a token bucket
  per client (`rate_per_client`: `count` tokens, refilled at count/period per
  second, one per new connection; a fresh client starts with a full bucket).
  Memory is bounded whatever the source of the addresses (accept, or PROXY
  headers that may name any): at most `capacity` clients in all, each one
  entry. A client with open connections is kept; one without is kept, in an
  LRU, only while its bucket is not full again (a bucket untouched for a
  whole period is the same as no entry, so it is dropped from the old end as
  new clients arrive). When the table is full, the least recently seen
  client without open connections is forgotten (its client starts afresh),
  as HAProxy's stick tables purge their oldest entries; when every entry has
  open connections, a new client is admitted without being counted
  (`untracked`). Under a flood from more distinct addresses than `capacity`,
  per-address limits cannot hold anyway; the table's size does.
- `LogOnce`: should this refusal be logged? At most once per client per
  interval, for at most `capacity` clients per interval; the rest are only
  counted (`suppressed`).

Nothing here reads a clock or does I/O: callers pass `now` (Trio's clock).
"""

from __future__ import annotations

import bisect
import heapq
import socket
from collections import OrderedDict
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Final, final

# Most rate buckets one listener keeps. An entry costs about 250 bytes (key,
# bucket, LRU links), so 10,000 clients seen within one period cost ~2.5 MiB.
MAX_TRACKED_CLIENTS: Final = 10_000
# Refusals logged per listener per interval at most; a flood is counted, not logged line by line.
MAX_LOGGED_PER_INTERVAL: Final = 1000
# A refused client is logged at most once in this many seconds.
LOG_INTERVAL: Final = 60.0

_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_MAPPED_NETWORK: Final = IPv6Network("::ffff:0:0/96")
_MAPPED_BASE: Final = int(_MAPPED_NETWORK.network_address)


def address_key(host: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer) for a host string; None if it is not an IP address.

    An IPv4-mapped IPv6 address gives the IPv4 address it carries.
    """
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed.startswith(_MAPPED_PREFIX):
                return 4, int.from_bytes(packed[12:], "big")
            return 6, int.from_bytes(packed, "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except (OSError, ValueError):
        return None


@final
class NetworkSet:
    """A set of CIDRs, asked whether it contains an address."""

    __slots__ = ("_ends", "_starts", "networks")

    def __init__(self, networks: Iterable[IPv4Network | IPv6Network]) -> None:
        self.networks = tuple(networks)
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in self.networks:
            if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED_NETWORK):
                mapped = network.network_address.ipv4_mapped
                assert mapped is not None
                network = IPv4Network((mapped, network.prefixlen - 96))
            first = int(network.network_address)
            ranges[network.version].append((first, first + network.num_addresses - 1))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, spans in ranges.items():
            merged: list[tuple[int, int]] = []
            for start, end in sorted(spans):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            self._starts[version] = [start for start, _ in merged]
            self._ends[version] = [end for _, end in merged]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        key = address_key(host) if isinstance(host, str) else None
        if key is None:
            return False
        version, value = key
        if self._has(version, value):
            return True
        # A mapped address also matches IPv6 networks that contain it as written (like ::/0).
        return version == 4 and ":" in host and self._has(6, _MAPPED_BASE | value)  # type: ignore[operator]

    def _has(self, version: int, value: int) -> bool:
        index = bisect.bisect_right(self._starts[version], value) - 1
        return index >= 0 and value <= self._ends[version][index]


# What `ClientTable.admit` answers when it admits a client (any other answer names the limit it hit).
COUNTED: Final = ""  # admitted, and counted until `release`
NOT_COUNTED: Final = "not_counted"  # admitted, but the table is full of clients with open connections


@final
class _Entry:
    """One client: its open connections and its rate bucket."""

    __slots__ = ("active", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.active = 0
        self.tokens = tokens
        self.stamp = stamp


@final
class ClientTable:
    """Open connections and connection-rate buckets per client, for one listener, at most `capacity`."""

    def __init__(self, max_connections: int = 0, rate: tuple[int, float] | None = None,
                 capacity: int = MAX_TRACKED_CLIENTS) -> None:  # fmt: skip
        self.capacity = capacity
        self._open: dict[str, _Entry] = {}  # clients with open connections
        # No open connection but a recent bucket; least recently seen first.
        self._idle: OrderedDict[str, _Entry] = OrderedDict()
        self.evicted = 0  # recent buckets forgotten because the table was full
        self.untracked = 0  # clients admitted uncounted: every entry had open connections
        self.max_connections = 0
        self.burst = 0.0
        self.per_second = 0.0
        self.period = 0.0
        self.configure(max_connections, rate)

    def configure(self, max_connections: int, rate: tuple[int, float] | None) -> None:
        """Change the limits (a reload); open connections and buckets carry over."""
        self.max_connections = max_connections
        if rate is None:
            self.burst = self.per_second = self.period = 0.0
            self._idle.clear()
        else:
            count, period = rate
            self.burst, self.period, self.per_second = float(count), period, count / period

    def __len__(self) -> int:
        return len(self._open) + len(self._idle)

    @property
    def active(self) -> dict[str, int]:
        """Open connections per client, for the clients that have any (a copy)."""
        return {client: entry.active for client, entry in self._open.items()}

    def tokens(self) -> list[float]:
        """Every rate bucket's tokens (a test's look inside)."""
        return [entry.tokens for entry in (*self._open.values(), *self._idle.values())]

    def admit(self, client: str, now: float) -> str:
        """Count a new connection from `client`: COUNTED, NOT_COUNTED, or the limit it hit."""
        entry = self._open.get(client)
        if entry is None:
            entry = self._idle.pop(client, None)
            if entry is None:
                if not self._make_room(now):
                    self.untracked += 1
                    return NOT_COUNTED
                entry = _Entry(self.burst, now)
        elif self.max_connections and entry.active >= self.max_connections:
            return "client_connections"
        if self.per_second and not self._take_token(entry, now):
            if not entry.active:
                self._idle[client] = entry  # its empty bucket is what refuses the next one too
            return "client_rate"
        entry.active += 1
        self._open[client] = entry
        return COUNTED

    def release(self, client: str) -> None:
        """A connection `admit` counted has ended."""
        entry = self._open.get(client)
        if entry is None:
            return
        entry.active -= 1
        if not entry.active:
            del self._open[client]
            if self.per_second:
                self._idle[client] = entry  # its bucket counts until it is full again

    def _take_token(self, entry: _Entry, now: float) -> bool:
        tokens = min(self.burst, entry.tokens + (now - entry.stamp) * self.per_second)
        entry.stamp = now
        if tokens < 1.0:
            entry.tokens = tokens
            return False
        entry.tokens = tokens - 1.0
        return True

    def _make_room(self, now: float) -> bool:
        """Room for one more client: drop full-again buckets, else the oldest idle one; False if none idle."""
        idle = self._idle
        while idle:
            oldest = next(iter(idle.values()))
            if now - oldest.stamp < self.period:
                break
            idle.popitem(last=False)
        if len(self) < self.capacity:
            return True
        if not idle:
            return False
        idle.popitem(last=False)
        self.evicted += 1
        return True

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The clients with the most open connections, most first."""
        return heapq.nsmallest(count, ((c, e.active) for c, e in self._open.items()),
                               key=lambda item: (-item[1], item[0]))  # fmt: skip


@final
class LogOnce:
    """Decides whether to log an event about a key: once per key per interval, boundedly."""

    def __init__(self, interval: float = LOG_INTERVAL, capacity: int = MAX_LOGGED_PER_INTERVAL) -> None:
        self.interval = interval
        self.capacity = capacity
        self.logged: OrderedDict[str, float] = OrderedDict()  # key → when it was logged, oldest first
        self.suppressed = 0  # events not logged because too many keys were logged this interval

    def should_log(self, key: str, now: float) -> bool:
        logged = self.logged
        while logged:
            first_key, first_time = next(iter(logged.items()))
            if now - first_time < self.interval:
                break
            del logged[first_key]
        if key in logged:
            return False
        if len(logged) >= self.capacity:
            self.suppressed += 1
            return False
        logged[key] = now
        return True
