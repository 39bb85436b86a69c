"""Servers discovered from DNS: A/AAAA records (every address a server) or SRV records.

Theory of operation: one task per `{ dns = … }` / `{ srv = … }` entry of a
pool, inside the pool's scope. It resolves with dnspython's async resolver
(which runs on Trio, so lookups never block the event loop), turns the answer
into the set of servers it describes, and diffs that against the servers the
same entry added before: new addresses join the pool (down until their first
health check, like any new server), vanished ones are removed, which stops
new connections at once while open ones finish (pool.remove). The first round
completes before `task_status.started()`, so a fresh start has its servers.

It re-resolves every `refresh`, or sooner when the records' TTL is shorter
(but not below a second). A lookup that fails (timeout,
NXDOMAIN, no records) keeps the last good set and is logged once until a
lookup succeeds again.

SRV records give host, port and weight; a weight of 0 becomes 1, since
weight 0 would mean "never" here.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import trio

from trioanubis.config import Address, DiscoveryConfig, ServerConfig, parse_address
from trioanubis.pool import Pool, Server

log = logging.getLogger("trioanubis.discovery")

# Re-resolving more often than this gains nothing and loads the DNS server.
MIN_REFRESH: Final = 1.0
# One lookup (all its retries) may take at most this long.
LOOKUP_LIFETIME: Final = 5.0


@dataclass(frozen=True, slots=True)
class Found:
    address: Address
    weight: int


class LookupFailed(Exception):
    pass


def make_resolver(nameserver: str) -> dns.asyncresolver.Resolver:
    """A resolver for "host:port", or the system's resolvers for ""."""
    if not nameserver:
        return dns.asyncresolver.Resolver()
    address = parse_address(nameserver)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address.host]
    resolver.port = address.port
    return resolver


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, kind: str, lifetime: float
) -> tuple[list[str], float]:
    """Record texts and the TTL; no records of this type → ([], inf)."""
    try:
        answer = await resolver.resolve(name, kind, lifetime=lifetime, search=False)
    except dns.resolver.NoAnswer:
        return [], float("inf")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        raise LookupFailed(f"{kind} {name}: {exc.__class__.__name__}: {exc}") from None
    ttl = float(answer.rrset.ttl) if answer.rrset is not None else float("inf")
    return [record.to_text() for record in answer], ttl


async def _addresses(
    resolver: dns.asyncresolver.Resolver, host: str, lifetime: float
) -> tuple[list[str], float]:
    v4, ttl4 = await _query(resolver, host, "A", lifetime)
    v6, ttl6 = await _query(resolver, host, "AAAA", lifetime)
    if not v4 and not v6:
        raise LookupFailed(f"{host}: no A or AAAA records")
    return v4 + v6, min(ttl4, ttl6)


async def lookup(resolver: dns.asyncresolver.Resolver, entry: DiscoveryConfig) -> tuple[set[Found], float]:
    """The servers `entry` names right now, and how long that answer may be cached."""
    lifetime = min(LOOKUP_LIFETIME, entry.refresh)
    if entry.kind == "dns":
        addresses, ttl = await _addresses(resolver, entry.name, lifetime)
        return {Found(Address(a, entry.port), entry.weight) for a in addresses}, ttl
    records, ttl = await _query(resolver, entry.name, "SRV", lifetime)
    if not records:
        raise LookupFailed(f"SRV {entry.name}: no records")
    found = set()
    for record in records:
        _priority, weight, port, target = record.split()
        addresses, target_ttl = await _addresses(resolver, target.rstrip(".") or ".", lifetime)
        ttl = min(ttl, target_ttl)
        found |= {Found(Address(a, int(port)), max(1, int(weight))) for a in addresses}
    return found, ttl


def source_of(entry: DiscoveryConfig) -> str:
    return f"{entry.kind}:{entry.name}" + (f":{entry.port}" if entry.kind == "dns" else "")


def apply(pool: Pool, entry: DiscoveryConfig, found: set[Found]) -> None:
    """Make the pool's servers from `entry` match `found`."""
    source = source_of(entry)
    current = {s.address: s for s in pool.servers if s.source == source}
    wanted = {f.address: f for f in found}
    for address, server in current.items():
        if address not in wanted:
            pool.remove(server)
            log.warning("pool %s: %s no longer lists %s; it gets no new connections", pool.name,
                        source, server.name)  # fmt: skip
            continue
        if server.weight != wanted[address].weight:
            pool.set_weight(server, wanted[address].weight)
        pool.set_priority(server, entry.priority)  # a reload may have changed it
    added = []
    for address, item in wanted.items():
        if address not in current:
            config = ServerConfig(address, str(address), item.weight, entry.max_connections,
                                  entry.priority)
            server = Server(config, healthy=pool.config.health.check == "none", source=source)
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            server.sockaddrs = [(family, (address.host, address.port))]
            added.append(server)
    if added:
        pool.add(added)
        log.warning("pool %s: %s added %s", pool.name, source, ", ".join(s.name for s in added))


async def run_discovery(
    pool: Pool,
    entry: DiscoveryConfig,
    nameserver: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `pool` in step with the DNS records of `entry` until cancelled."""
    resolver = make_resolver(nameserver)
    failing = False
    started = False
    while True:
        wait = entry.refresh
        try:
            found, ttl = await lookup(resolver, entry)
        except LookupFailed as exc:
            if not failing:
                log.error("pool %s: DNS lookup failed, keeping the last good servers: %s", pool.name, exc)
            failing = True
        else:
            if failing:
                log.warning("pool %s: DNS lookups of %s work again", pool.name, source_of(entry))
            failing = False
            apply(pool, entry, found)
            wait = min(entry.refresh, max(MIN_REFRESH, ttl))  # a short TTL shortens, to 1 s at most
        if not started:
            started = True
            task_status.started()
        await trio.sleep(wait)
