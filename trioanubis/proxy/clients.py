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
  Memory is bounded: a client's open-connection entry exists only while it has
  open connections (bounded by the connection limit), and the buckets live in
  an LRU of at most `capacity` entries. A bucket that has not been touched
  for a whole period is full again, the same as no entry, so it is dropped
  from the old end as new clients arrive; when the table is full of recent
  clients the least recently seen is forgotten (its client starts afresh), as
  HAProxy's stick tables purge their oldest entries. Under a flood from more
  distinct addresses than `capacity`, per-address limits cannot hold anyway;
  the table's size does.
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


@final
class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


@final
class ClientTable:
    """Open connections and connection-rate buckets per client, for one listener."""

    def __init__(self, max_connections: int = 0, rate: tuple[int, float] | None = None,
                 capacity: int = MAX_TRACKED_CLIENTS) -> None:  # fmt: skip
        self.capacity = capacity
        self.active: dict[str, int] = {}  # clients with open connections only
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first
        self.evicted = 0  # buckets forgotten while still recent, because the table was full
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
            self.buckets.clear()
        else:
            count, period = rate
            self.burst, self.period, self.per_second = float(count), period, count / period

    def __len__(self) -> int:
        return len(self.active) + len(self.buckets)

    def admit(self, client: str, now: float) -> str:
        """Count a new connection from `client`: "" if admitted, else the limit it hit."""
        if self.max_connections and self.active.get(client, 0) >= self.max_connections:
            return "client_connections"
        if self.per_second and not self._take_token(client, now):
            return "client_rate"
        self.active[client] = self.active.get(client, 0) + 1
        return ""

    def release(self, client: str) -> None:
        """A connection `admit` counted has ended (unknown clients are ignored: a reload started it)."""
        count = self.active.get(client, 0)
        if count > 1:
            self.active[client] = count - 1
        elif count:
            del self.active[client]

    def _take_token(self, client: str, now: float) -> bool:
        bucket = self.buckets.get(client)
        if bucket is None:
            self._expire(now)
            self.buckets[client] = _Bucket(self.burst - 1.0, now)
            return True
        self.buckets.move_to_end(client)
        tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.per_second)
        bucket.stamp = now
        if tokens < 1.0:
            bucket.tokens = tokens
            return False
        bucket.tokens = tokens - 1.0
        return True

    def _expire(self, now: float) -> None:
        """Make room for one bucket: drop full-again ones from the old end, or the oldest if none is."""
        buckets = self.buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if now - oldest.stamp < self.period:
                break
            buckets.popitem(last=False)
        if len(buckets) >= self.capacity:
            buckets.popitem(last=False)
            self.evicted += 1

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The clients with the most open connections, most first."""
        return heapq.nsmallest(count, self.active.items(), key=lambda item: (-item[1], item[0]))


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
