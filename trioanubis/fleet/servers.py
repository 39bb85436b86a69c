"""A pool's servers from etcd keys (`servers_from = "etcd"`), applied through Pool methods.

Theory of operation: a server from etcd is a `Server` whose `source` is
`ETCD_SOURCE`; it is added, changed and removed here only, one key at a
time, as discovery.py does for DNS (and a reload leaves such servers to this
module: reload.py `update_servers`). `put_server` makes the pool hold the
entry a key names: a new name joins (down until its first health check,
unless the pool checks nothing), a changed address is a new server (the old
one stops taking connections and leaves once idle), a changed weight,
limit, priority or faults table is applied in place (`Pool.configure_server`).
`delete_server` removes it. A key whose name is already a server of another
source (the file, the admin) is refused: two owners of one name would undo
each other.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

from trioanubis.config import ServerConfig
from trioanubis.fleet.keys import BadValue
from trioanubis.pool import ETCD_SOURCE, Pool, Server
from trioanubis.resolve import SockAddr

log = logging.getLogger("trioanubis.fleet")



def literal_sockaddrs(entry: ServerConfig) -> list[SockAddr] | None:
    """The address as a sockaddr when it is an IP literal; None for a name (resolved before use)."""
    host = entry.address.host
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.inet_pton(family, host)
    except OSError:
        return None
    return [(family, (host, entry.address.port))]


def etcd_server(pool: Pool, name: str) -> Server | None:
    return next((s for s in pool.servers if s.name == name and s.source == ETCD_SOURCE), None)


def put_server(pool: Pool, entry: ServerConfig, sockaddrs: list[SockAddr] | None) -> None:
    """Make `pool` hold `entry` as its etcd server of that name; BadValue if another source has the name."""
    current = etcd_server(pool, entry.name)
    if current is None and pool.find(entry.name) is not None:
        raise BadValue(f"pool {pool.name}: server {entry.name!r} exists already (from the config file or "
                       "the admin); the etcd key is ignored")  # fmt: skip
    if current is not None and current.address == entry.address:
        pool.configure_server(current, entry)
        return
    if current is not None:
        pool.remove(current)
    server = Server(entry, healthy=pool.config.health.check == "none", source=ETCD_SOURCE,
                    sockaddrs=sockaddrs)  # fmt: skip
    pool.add([server])
    log.info("pool %s: server %s (%s) %s from etcd", pool.name, entry.name, entry.address,
             "added" if current is None else "moved")  # fmt: skip


def delete_server(pool: Pool, name: str) -> None:
    server = etcd_server(pool, name)
    if server is None:
        return
    pool.remove(server)
    log.info("pool %s: server %s removed from etcd (no new connections%s)", pool.name, name,
             f"; {server.active} open go on" if server.active else "")  # fmt: skip


def sync_servers(pool: Pool, entries: Mapping[str, tuple[ServerConfig, list[SockAddr] | None]]) -> None:
    """After a read of every key (start, compaction, a reload's new pool): the pool's etcd servers are
    `entries` (name → entry and its addresses), no more. A refusal is logged, and the rest applied."""
    for server in [s for s in pool.servers if s.source == ETCD_SOURCE and s.name not in entries]:
        delete_server(pool, server.name)
    for entry, sockaddrs in entries.values():
        try:
            put_server(pool, entry, sockaddrs)
        except BadValue as exc:
            log.warning("cluster: %s", exc)
