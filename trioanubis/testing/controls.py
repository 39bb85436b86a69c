"""Runtime controls of an embedded balancer: drain, enable, weight, faults, add and remove a server.

Theory of operation: each control finds the pool and the server by name
(the server also by its "host:port") and changes it through its `Pool`'s
method, the one writer of server state (pool.py), so it is logged and the
pool's candidates are rebuilt exactly as when the admin API asks. A name
that is not there is a `LookupError` naming what exists; a value out of
range a `ValueError` (faults: the `ConfigError` of the `[faults]` table's
parser, which is one).

These are plain functions over the balancer's pools, kept in this one module
so that they can move to the runtime command path (one path for the admin
API, the CLI and embedding) when it exists, without the handles changing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trioanubis.config import MAX_WEIGHT, FaultConfig, ServerConfig, parse_address, parse_faults
from trioanubis.pool import Pool, Server
from trioanubis.proxy.faults import NO_FAULTS
from trioanubis.resolve import resolve_address


def find_pool(pools: Mapping[str, Pool], name: str) -> Pool:
    pool = pools.get(name)
    if pool is None:
        raise LookupError(f"no pool {name!r} (pools: {', '.join(sorted(pools)) or 'none'})")
    return pool


def find_server(pools: Mapping[str, Pool], pool_name: str, key: str) -> tuple[Pool, Server]:
    """A pool's server by name or by "host:port"."""
    pool = find_pool(pools, pool_name)
    server = pool.find(key)
    if server is None:
        names = ", ".join(s.name for s in pool.servers) or "none"
        raise LookupError(f"pool {pool_name!r} has no server {key!r} (servers: {names})")
    return pool, server


def drain(pools: Mapping[str, Pool], pool: str, server: str) -> None:
    """No new connections to the server; open ones go on."""
    found, chosen = find_server(pools, pool, server)
    found.set_draining(chosen, True)


def enable(pools: Mapping[str, Pool], pool: str, server: str) -> None:
    found, chosen = find_server(pools, pool, server)
    found.set_draining(chosen, False)


def set_weight(pools: Mapping[str, Pool], pool: str, server: str, weight: int) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 0 to {MAX_WEIGHT}, got {weight!r}")
    found, chosen = find_server(pools, pool, server)
    found.set_weight(chosen, weight)


def set_faults(pools: Mapping[str, Pool], pool: str, server: str,
               faults: Mapping[str, Any] | FaultConfig | None) -> None:  # fmt: skip
    """Replace the server's `[faults]` (new connections): a table as in the config, a FaultConfig,
    None to clear them (the pool's table, if any, no longer applies either)."""
    table = NO_FAULTS if faults is None else faults if isinstance(faults, FaultConfig) else parse_faults(
        dict(faults), f"faults of {pool}/{server}")  # fmt: skip
    found, chosen = find_server(pools, pool, server)
    found.set_faults(chosen, table)


async def add_server(pools: Mapping[str, Pool], pool: str, address: str, *, name: str = "",
                     weight: int = 1) -> None:  # fmt: skip
    """Resolve "host:port" and add it to the pool (healthy at once when the pool checks nothing,
    else once its health checks say so)."""
    found = find_pool(pools, pool)
    where = parse_address(address)
    if found.find(name or address) is not None:
        raise ValueError(f"pool {pool!r} has a server {name or address!r} already")
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 0 to {MAX_WEIGHT}, got {weight!r}")
    server = Server(ServerConfig(where, name or address, weight), healthy=found.config.health.check == "none")
    found.set_addresses(server, await resolve_address(where))
    found.add([server])


def remove_server(pools: Mapping[str, Pool], pool: str, server: str) -> None:
    """Take the server out; its open connections go on until they end."""
    found, chosen = find_server(pools, pool, server)
    found.remove(chosen)
