"""Servers discovered from DNS: A/AAAA records (every address a server) or SRV records.

Theory of operation: one task per `{ dns = … }` / `{ srv = … }` entry of a
pool, inside the pool's scope. It resolves the entry, turns the answer into
the set of servers it describes, and diffs that against the servers the same
entry added before: new addresses join the pool (down until their first
health check, like any new server), vanished ones are removed, which stops
new connections at once while open ones finish (pool.remove). The first round
completes before `task_status.started()`, so a fresh start has its servers.

Where names come from, like the system's own lookups:
- With no `resolver` set, a host name goes through getaddrinfo (Trio runs it
  in a worker thread), so /etc/hosts, nsswitch and the system's resolvers all
  apply; getaddrinfo gives no TTL, so the answer lasts `refresh`.
- With a `resolver`, a name in the hosts file still resolves from the hosts
  file (as "files" comes before "dns" in nsswitch.conf); any other name is
  asked of the resolver with dnspython's async resolver, which runs on Trio.
- SRV records always come from DNS (dnspython); their targets resolve as above.

A and AAAA are asked separately and are independent, as in getaddrinfo: when
one fails (dnsmasq with no upstream answers REFUSED for a family it has no
record of) the other's answer is used, together with the last good answer of
the failed family, and the log names the family, once per change. Only when
nothing usable comes back does the lookup fail.

It re-resolves every `refresh`, or sooner when the records' TTL is shorter
(but not below a second). A lookup that fails (timeout, NXDOMAIN, no
records, a malformed answer) keeps the last good set and is logged once until
a lookup succeeds again. Nothing a DNS answer contains escapes this module:
an unexpected exception is logged (with its traceback, once) and handled like
a failed lookup.

SRV records give host, port and weight; a weight of 0 becomes 1, since
weight 0 would mean "never" here. A target of "." or a port of 0 means "no
service here" (RFC 2782) and is skipped.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.config import Address, DiscoveryConfig, ServerConfig, ip_address_or_none, parse_address
from trioanubis.pool import Pool, Server, diff_servers
from trioanubis.resolve import resolve_address

if TYPE_CHECKING:  # dnspython is imported at first use: 35 ms of every start that names no DNS entry
    import dns.asyncresolver
    import dns.rdata

log = logging.getLogger("trioanubis.discovery")

# Re-resolving more often than this gains nothing and loads the DNS server.
MIN_REFRESH: Final = 1.0
# One lookup (all its retries) may take at most this long.
LOOKUP_LIFETIME: Final = 5.0
# An answer naming more servers than this is cut (a hostile or broken zone must not grow a pool
# without bound); far above any real pool.
MAX_FOUND: Final = 1024
# The system's hosts file, read at each lookup when a resolver is set (it is small, and may change).
HOSTS_FILE: Final = (
    os.path.join(os.environ.get("SYSTEMROOT", r"C:\Windows"), "System32", "drivers", "etc", "hosts")
    if os.name == "nt"
    else "/etc/hosts"
)
# More of a hosts file than this is not read.
MAX_HOSTS_FILE: Final = 1 << 20
FAMILIES: Final = ("A", "AAAA")


@dataclass(frozen=True, slots=True)
class Found:
    address: Address
    weight: int


class LookupFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Answer:
    """What one lookup found; `failed` names the families that failed while another answered."""

    found: frozenset[Found]
    ttl: float
    failed: dict[str, str] = field(default_factory=dict)  # "AAAA api.test" → why


def make_resolver(nameserver: str) -> dns.asyncresolver.Resolver:
    """A resolver for "host:port", or the system's resolvers for ""."""
    import dns.asyncresolver

    if not nameserver:
        return dns.asyncresolver.Resolver()
    address = parse_address(nameserver)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address.host]
    resolver.port = address.port
    return resolver


def hosts_table(text: str) -> dict[str, list[str]]:
    """Name (lower-case) → addresses, from a hosts file's text; lines with no valid address are skipped."""
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or ip_address_or_none(fields[0]) is None:
            continue
        for name in fields[1:]:
            addresses = table.setdefault(name.lower().rstrip("."), [])
            if fields[0] not in addresses:
                addresses.append(fields[0])
    return table



def _read_hosts(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(MAX_HOSTS_FILE)
    except OSError:
        return ""


@final
class Lookups:
    """One discovery entry's way to names: system or DNS, and each family's last good answer."""

    def __init__(self, nameserver: str, hosts_file: str | None = None) -> None:
        self.nameserver = nameserver
        self.hosts_file = hosts_file or HOSTS_FILE
        self._dns: dns.asyncresolver.Resolver | None = None
        self.last: dict[tuple[str, str], list[str]] = {}  # (name, family) → its last good records
        self.failed: dict[str, str] = {}  # this lookup's failed families, "AAAA name" → why
        self.asked: set[str] = set()  # the names this lookup asked DNS about

    @property
    def dns(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver, made at first use (with no resolver set it reads resolv.conf,
        which may be missing: that is a failed lookup, not a crash)."""
        if self._dns is None:
            import dns.exception

            try:
                self._dns = make_resolver(self.nameserver)
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                raise LookupFailed(f"no DNS resolver: {exc}") from None
        return self._dns

    async def hosts(self) -> dict[str, list[str]]:
        """The hosts file, read again at each lookup (it is small and may change); {} with no resolver,
        where getaddrinfo reads it itself."""
        if not self.nameserver:
            return {}
        return hosts_table(await trio.to_thread.run_sync(_read_hosts, self.hosts_file))


async def _query(resolver: dns.asyncresolver.Resolver, name: str, kind: str, lifetime: float
                 ) -> tuple[list[dns.rdata.Rdata], float]:  # fmt: skip
    """Records and the TTL; no records of this type → ([], inf)."""
    import dns.exception
    import dns.resolver

    try:
        answer = await resolver.resolve(name, kind, lifetime=lifetime, search=False)
    except dns.resolver.NoAnswer:
        return [], float("inf")
    except (dns.exception.DNSException, OSError, ValueError) as exc:
        raise LookupFailed(f"{kind} {name}: {exc.__class__.__name__}: {exc}") from None
    ttl = float(answer.rrset.ttl) if answer.rrset is not None else float("inf")
    return list(answer), ttl


async def _system_addresses(host: str) -> tuple[list[str], float]:
    """Addresses from getaddrinfo, which gives no TTL (so: until the next refresh)."""
    try:
        sockaddrs = await resolve_address(Address(host, 0))
    except (OSError, UnicodeError) as exc:
        raise LookupFailed(f"{host}: {exc}") from None
    addresses = [str(sockaddr[0]) for _, sockaddr in sockaddrs]
    return list(dict.fromkeys(addresses)), float("inf")


async def _dns_addresses(lookups: Lookups, host: str, lifetime: float) -> tuple[list[str], float]:
    """A and AAAA asked at once; a failed family keeps its last good answer if the other answered."""
    outcomes: dict[str, tuple[list[str], float] | LookupFailed] = {}
    lookups.asked.add(host)

    async def ask(kind: str) -> None:
        try:
            records, ttl = await _query(lookups.dns, host, kind, lifetime)
            outcomes[kind] = ([record.to_text() for record in records], ttl)
        except LookupFailed as exc:
            outcomes[kind] = exc

    async with trio.open_nursery() as nursery:
        for kind in FAMILIES:
            nursery.start_soon(ask, kind)
    errors = {kind: o for kind, o in outcomes.items() if isinstance(o, LookupFailed)}
    if len(errors) == len(FAMILIES):
        raise LookupFailed("; ".join(str(e) for e in errors.values()))
    addresses: list[str] = []
    ttl = float("inf")
    for kind in FAMILIES:
        outcome = outcomes[kind]
        if isinstance(outcome, LookupFailed):
            last = lookups.last.get((host, kind), [])
            using = "its last good answer and the other family's" if last else "the other family's answer"
            lookups.failed[f"{kind} {host}"] = f"{outcome}; using {using}"
            addresses += last
        else:
            lookups.last[(host, kind)] = outcome[0]
            addresses += outcome[0]
            ttl = min(ttl, outcome[1])
    if not addresses:  # the family that answered has no records; the failed one might have had some
        raise LookupFailed("; ".join(str(e) for e in errors.values()) or f"{host}: no A or AAAA records")
    return addresses, ttl


async def _addresses(lookups: Lookups, host: str, lifetime: float, hosts: dict[str, list[str]]
                     ) -> tuple[list[str], float]:  # fmt: skip
    if not lookups.nameserver:
        return await _system_addresses(host)
    in_hosts = hosts.get(host.lower().rstrip("."))
    if in_hosts:
        return list(in_hosts), float("inf")
    return await _dns_addresses(lookups, host, lifetime)


async def lookup(lookups: Lookups, entry: DiscoveryConfig) -> Answer:
    """The servers `entry` names right now, how long that answer may be cached, what failed."""
    lookups.failed, lookups.asked = {}, set()
    answer = await _lookup(lookups, entry, await lookups.hosts())
    lookups.last = {key: v for key, v in lookups.last.items() if key[0] in lookups.asked}  # SRV targets go
    return answer


async def _lookup(lookups: Lookups, entry: DiscoveryConfig, hosts: dict[str, list[str]]) -> Answer:
    lifetime = min(LOOKUP_LIFETIME, entry.refresh)
    if entry.kind == "dns":
        addresses, ttl = await _addresses(lookups, entry.name, lifetime, hosts)
        found = {Found(Address(a, entry.port), entry.weight) for a in addresses}
        return Answer(_capped(found, lookups, entry), ttl, lookups.failed)
    import dns.rdtypes.IN.SRV

    records, ttl = await _query(lookups.dns, entry.name, "SRV", lifetime)
    found = set()
    for record in records:
        if not isinstance(record, dns.rdtypes.IN.SRV.SRV):
            continue
        target = record.target.to_text().rstrip(".")
        if not target or record.port == 0:
            continue  # RFC 2782: "." means the service is decidedly not available here
        addresses, target_ttl = await _addresses(lookups, target, lifetime, hosts)
        ttl = min(ttl, target_ttl)
        found |= {Found(Address(a, record.port), max(1, record.weight)) for a in addresses}
    if not found:
        raise LookupFailed(f"SRV {entry.name}: no usable records")
    return Answer(_capped(found, lookups, entry), ttl, lookups.failed)


def _capped(found: set[Found], lookups: Lookups, entry: DiscoveryConfig) -> frozenset[Found]:
    if len(found) <= MAX_FOUND:
        return frozenset(found)
    lookups.failed[f"size {entry.name}"] = f"{len(found)} servers; only the first {MAX_FOUND} are used"
    kept = sorted(found, key=lambda f: (f.address.host, f.address.port))[:MAX_FOUND]
    return frozenset(kept)


def source_of(entry: DiscoveryConfig) -> str:
    return f"{entry.kind}:{entry.name}" + (f":{entry.port}" if entry.kind == "dns" else "")


def apply(pool: Pool, entry: DiscoveryConfig, found: frozenset[Found]) -> None:
    """Make the pool's servers from `entry` match `found`."""
    source = source_of(entry)
    removed, kept, new = diff_servers({s.address: s for s in pool.servers if s.source == source},
                                      {f.address: f for f in found})  # fmt: skip
    for server in removed:
        pool.remove(server)
        log.info("pool %s: %s no longer lists %s; it gets no new connections", pool.name,
                 source, server.name)  # fmt: skip
    for server, item in kept:
        if server.weight != item.weight:
            pool.set_weight(server, item.weight)
        pool.set_priority(server, entry.priority)  # a reload may have changed it
    added = []
    for item in new:
        address = item.address
        config = ServerConfig(address, str(address), item.weight, entry.max_connections,
                              priority=entry.priority)  # fmt: skip
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        added.append(Server(config, healthy=pool.config.health.check == "none", source=source,
                            sockaddrs=[(family, (address.host, address.port))]))  # fmt: skip
    if added:
        pool.add(added)
        log.info("pool %s: %s added %s", pool.name, source, ", ".join(s.name for s in added))


@final
class Reporter:
    """Logs a discovery entry's troubles once per change, not once per refresh."""

    def __init__(self, pool: Pool, entry: DiscoveryConfig) -> None:
        self.prefix = f"pool {pool.name}: {source_of(entry)}"
        self.failing = False
        self.partial: dict[str, str] = {}

    def failed(self, why: str, *, bug: bool = False) -> None:
        if not self.failing:
            log.error("%s: DNS lookup failed, keeping the last good servers: %s", self.prefix, why,
                      exc_info=bug)  # fmt: skip
        self.failing = True

    def succeeded(self, answer: Answer) -> None:
        if self.failing:
            log.info("%s: DNS lookups work again", self.prefix)
        self.failing = False
        for key in answer.failed.keys() - self.partial.keys():
            log.warning("%s: %s", self.prefix, answer.failed[key])
        for key in self.partial.keys() - answer.failed.keys():
            log.info("%s: %s works again", self.prefix, key)
        self.partial = dict(answer.failed)


async def run_discovery(
    pool: Pool,
    entry: DiscoveryConfig,
    nameserver: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `pool` in step with the DNS records of `entry` until cancelled.

    Every lookup runs inside a boundary: whatever an answer makes it raise is
    logged once and handled as a failed lookup, so discovery never stops the pool.
    """
    lookups = Lookups(nameserver)
    report = Reporter(pool, entry)
    started = False
    while True:
        wait = entry.refresh
        try:
            answer = await lookup(lookups, entry)
        except LookupFailed as exc:
            report.failed(str(exc))
        except Exception as exc:  # a bug, or an answer nobody foresaw: never past this line
            report.failed(f"internal error: {exc.__class__.__name__}: {exc}", bug=True)
        else:
            report.succeeded(answer)
            apply(pool, entry, answer.found)
            wait = min(entry.refresh, max(MIN_REFRESH, answer.ttl))  # a short TTL shortens, to 1 s at most
        if not started:
            started = True
            task_status.started()
        await trio.sleep(wait)
