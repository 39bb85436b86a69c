"""Reload: what a new config changes in the running balancer, decided apart from carrying it out.

Theory of operation: SIGHUP, `anubis reload`, `--watch` and the worker
supervisor all end in `app.Balancer.apply_config`, which asks this module
what changes and carries it out. `plan` compares what runs (the pools and
the listeners' own configs, which may differ from the last file when a
rebind failed) with the new config: pools added, kept (reconfigured in
place, their servers diffed) and removed; listeners reconfigured in place
(the same bind, however it is written: the socket and its backlog stay),
bound anew (new, or a new bind: the new socket listens before the old one
closes) and removed; and the settings only a restart applies, one warning
each. Its one lookup is "localhost" in a bind (config/checks.py `listen_ip`),
so the balancer runs it in a worker thread, on immutable values only.

`update_servers` brings a kept pool's servers from the file to the new
list through `pool.diff_servers`, the comparison discovery makes for DNS
answers: servers that left the file are removed (their open connections go
on), kept ones take their new priority and limits, and a new weight or
fault table when the file changed it (what the admin API set survives a
reload of an unchanged file, as a drain does), and new ones are returned for
the caller to resolve and add. Servers that discovery
or the spawner put in the pool are theirs, not the file's. Servers an
operator added or removed at runtime stay so until the file says something
new about their name (control.py `reconcile` decides, before the diff); a
runtime server the file now names is the file's from then on (`take_over`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, final

from trioanubis.config import Address, Config, ListenerConfig, PoolConfig, listen_ip
from trioanubis.control import RUNTIME_SOURCE
from trioanubis.discovery import source_of
from trioanubis.fleet.servers import ETCD_SOURCE
from trioanubis.pool import Pool, Server, diff_servers
from trioanubis.spawn import SPAWN_SOURCE

log = logging.getLogger("trioanubis.app")

IO_WARNING: Final = "reload: settings.io changes take effect at the next restart"
ADMIN_WARNING: Final = "reload: adding or removing [admin] takes effect at the next restart"


@final
@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The changes a new config makes, by name."""

    pools_added: tuple[str, ...]
    pools_kept: tuple[str, ...]
    pools_removed: tuple[str, ...]
    listeners_reconfigured: tuple[str, ...]  # the same bind: the socket stays
    listeners_bound: tuple[str, ...]  # new, or a new bind: a new socket first
    listeners_removed: tuple[str, ...]
    warnings: tuple[str, ...]


def plan(
    running: Config, pools: Collection[str], listeners: Mapping[str, ListenerConfig], new: Config,
    *, io_forced: bool,
) -> ReloadPlan:  # fmt: skip
    """What `new` changes, given the running config, pools and listeners' configs."""
    warnings = []
    if (running.admin is None) != (new.admin is None):
        warnings.append(ADMIN_WARNING)
    if new.settings.io != running.settings.io and not io_forced:
        warnings.append(IO_WARNING)
    running_binds = {name: _bind_key(config.bind) for name, config in listeners.items()}
    same_bind = {name for name, config in new.listeners.items()
                 if running_binds.get(name) == _bind_key(config.bind)}  # fmt: skip
    return ReloadPlan(
        pools_added=tuple(n for n in new.pools if n not in pools),
        pools_kept=tuple(n for n in new.pools if n in pools),
        pools_removed=tuple(n for n in pools if n not in new.pools),
        listeners_reconfigured=tuple(n for n in new.listeners if n in same_bind),
        listeners_bound=tuple(n for n in new.listeners if n not in same_bind),
        listeners_removed=tuple(n for n in listeners if n not in new.listeners),
        warnings=tuple(warnings),
    )


def _bind_key(bind: Address) -> tuple[str, int]:
    """A bind as the socket sees it: ":8000" and "0.0.0.0:8000" are one address, as "::0" and "::",
    and "localhost:8000" and "127.0.0.1:8000" where localhost is 127.0.0.1."""
    ip = listen_ip(bind.host)
    return (bind.host.lower() if ip is None else str(ip)), bind.port


def update_servers(pool: Pool, config: PoolConfig, runtime: Collection[str] = ()) -> list[Server]:
    """Bring `pool`'s servers from the file to `config.servers`; the new ones, to resolve and add.

    Names in `runtime` (added or removed by an operator, and not given anew by the file: control.py
    `reconcile`) are left as the operator left them, on both sides of the diff.
    """
    others = {source_of(entry) for entry in config.discovery}
    if config.spawn is not None:
        others.add(SPAWN_SOURCE)  # the spawner owns those
    if config.servers_from == "etcd":
        others.add(ETCD_SOURCE)  # the fleet's etcd keys own those
    removed, kept, new = diff_servers({(s.name, s.address): s for s in pool.servers if s.name not in runtime},
                                      {(sc.name, sc.address): sc for sc in config.servers
                                       if sc.name not in runtime})  # fmt: skip
    for server in removed:
        if server.source not in others:
            pool.remove(server)
            log.info("reload: pool %s: server %s removed (its open connections go on)",
                     pool.name, server.name)  # fmt: skip
    for server, sc in kept:
        if server.source == RUNTIME_SOURCE:
            pool.take_over(server, sc)
        else:
            pool.configure_server(server, sc)
    return [Server(sc, healthy=config.health.check == "none") for sc in new]
