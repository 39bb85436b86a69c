"""Reload: what a new config changes in the running balancer, decided, then carried out.

Theory of operation: SIGHUP, `anubis reload`, `--watch`, the worker
supervisor and the embedding API all end in `app.Balancer.apply_config`,
which takes the runtime lock and calls `apply_config` here. The decision is
pure: `plan` compares what runs (the pools and
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

`apply_config` carries the plan out on the running balancer, which it knows
only as `Running` (what a reload needs of it: its pools, listeners and
settings, and the plumbing that starts and stops a listener, a pool's tasks
or its replicas in the balancer's nursery tree). The order keeps every
client served: kept pools are reconfigured and new pools started (their
first health round included) before any listener is bound or moved, new
listeners listen before old ones close, and a pool is removed only once no
listener sends clients to it. Established connections are never touched: a
removed server keeps its connections until they end.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

from trioanubis.config import (
    Address,
    AdminConfig,
    Config,
    ListenerConfig,
    PoolConfig,
    ServerConfig,
    listen_ip,
)
from trioanubis.control import RUNTIME_SOURCE
from trioanubis.discovery import source_of
from trioanubis.errors import AnubisError
from trioanubis.pool import ETCD_SOURCE, Pool, Server, diff_servers
from trioanubis.spawn import SPAWN_SOURCE
from trioanubis.strategies import make_strategy

if TYPE_CHECKING:
    from trioanubis.control import Control
    from trioanubis.fleet.fleet import Fleet
    from trioanubis.ops.accesslog import AccessLog
    from trioanubis.proxy.lifecycle import Limits
    from trioanubis.proxy.listener import Listener
    from trioanubis.proxy.timeouts import Timer

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
    changes = server_changes(pool, config, runtime)
    _apply_server_changes(pool, changes, add=False)
    return changes.new


@dataclass(frozen=True, slots=True)
class ServerChanges:
    """What brings a pool's servers to the file's list: decided first, applied with no checkpoint."""

    removed: list[Server]
    kept: list[tuple[Server, ServerConfig]]
    new: list[Server]


def server_changes(pool: Pool, config: PoolConfig, runtime: Collection[str] = ()) -> ServerChanges:
    """The diff between `pool`'s servers and `config`'s, without changing the pool."""
    others = {source_of(entry) for entry in config.discovery}
    if config.spawn is not None:
        others.add(SPAWN_SOURCE)  # the spawner owns those
    if config.servers_from == "etcd":
        others.add(ETCD_SOURCE)  # the fleet's etcd keys own those
    removed, kept, new = diff_servers({(s.name, s.address): s for s in pool.servers if s.name not in runtime},
                                      {(sc.name, sc.address): sc for sc in config.servers
                                       if sc.name not in runtime})  # fmt: skip
    return ServerChanges([server for server in removed if server.source not in others], kept,
                         [Server(sc, healthy=config.health.check == "none") for sc in new])  # fmt: skip


def _apply_server_changes(pool: Pool, changes: ServerChanges, *, add: bool) -> None:
    """Remove, reconfigure and add in one step: no task runs between, so no connection finds the
    pool half changed (a reload that replaces a pool's only server never leaves it empty)."""
    for server in changes.removed:
        pool.remove(server)
        log.info("reload: pool %s: server %s removed (its open connections go on)", pool.name, server.name)
    for server, sc in changes.kept:
        if server.source == RUNTIME_SOURCE:
            pool.take_over(server, sc)
        else:
            pool.configure_server(server, sc)
    if add and changes.new:
        pool.add(changes.new)
        log.info("reload: pool %s: %s added", pool.name, ", ".join(s.name for s in changes.new))


class TakesAdminConfig(Protocol):
    def apply(self, config: AdminConfig) -> None: ...


class Running(Protocol):
    """What a reload needs of the running balancer (app.py's `Balancer` is it)."""

    config: Config
    pools: dict[str, Pool]
    listeners: dict[str, Listener]
    io: str  # `--io`: wins over [settings] io for the life of the process
    control: Control
    fleet: Fleet | None
    access: AccessLog
    limits: Limits
    timer: Timer
    reloads: int
    reload_failures: int

    @property
    def admin(self) -> TakesAdminConfig | None: ...
    def connection_limit(self, config: Config) -> int: ...
    def tick_for(self, config: Config) -> float: ...
    async def resolve(self, servers: list[Server], pool: Pool) -> None: ...
    async def start_pool_tasks(self, pool: Pool) -> None: ...
    def stop_pool_tasks(self, name: str) -> None: ...
    async def update_spawner(self, pool: Pool) -> None: ...
    def stop_spawner(self, name: str) -> None: ...
    async def start_listener(self, config: ListenerConfig) -> Listener: ...


async def apply_config(running: Running, new: Config) -> None:
    """Bring `running` to `new` without touching established connections (see the module docstring)."""
    listening = {name: listener.config for name, listener in running.listeners.items()}
    decide = functools.partial(plan, running.config, tuple(running.pools), listening, new,
                               io_forced=bool(running.io))  # fmt: skip
    changes = await trio.to_thread.run_sync(decide)  # it may look "localhost" up
    for warning in changes.warnings:
        log.warning("%s", warning)
    if running.admin is not None and new.admin is not None:
        running.admin.apply(new.admin)  # the token now, a new bind at the next restart
    if new.cluster != running.config.cluster:
        log.warning("reload: a changed [cluster] table takes effect at the next restart")
    running.control.reconcile(running.config.pools, new.pools)  # before the servers' diff
    for name in changes.pools_kept:
        await _update_pool(running, running.pools[name], new.pools[name])
    for name in changes.pools_added:
        pool = running.pools[name] = Pool(new.pools[name])
        await running.resolve(pool.servers, pool)
        await running.update_spawner(pool)
        if running.fleet is not None:
            running.fleet.sync_pool(pool)
        await running.start_pool_tasks(pool)
        log.info("reload: pool %s added", name)
    for name in changes.listeners_reconfigured:
        running.listeners[name].reconfigure(new.listeners[name])
    failed = [name for name in changes.listeners_bound
              if not await _bind_listener(running, name, new.listeners[name])]  # fmt: skip
    for name in changes.listeners_removed:
        running.listeners.pop(name).stop()
        log.info("reload: listener %s removed", name)
    _remove_pools(running, changes.pools_removed)
    running.access.enabled = new.settings.access_log
    running.limits.max_connections = running.connection_limit(new)
    running.timer.tick = running.tick_for(new)
    running.config = new
    if failed:
        running.reload_failures += 1
        log.error("reload applied except for listener %s, which keeps its old address and pool "
                  "(the next reload tries again)", ", ".join(failed))  # fmt: skip
        return
    running.reloads += 1
    log.info("reload applied")


def _remove_pools(running: Running, names: Collection[str]) -> None:
    in_use = {pool for listener in running.listeners.values() for pool in _pools_of(listener.config)}
    for name in names:
        if name in in_use:  # a listener whose new bind failed still sends its clients there
            users = ", ".join(n for n, li in running.listeners.items() if name in _pools_of(li.config))
            log.warning("reload: pool %s kept: listener %s still uses it", name, users)
            continue
        running.stop_pool_tasks(name)
        running.stop_spawner(name)
        running.pools.pop(name).shut()  # clients it holds leave now, not at their queue_timeout
        log.info("reload: pool %s removed", name)


async def _bind_listener(running: Running, name: str, config: ListenerConfig) -> bool:
    """A new listener, or one on a new bind: the new socket listens before the old one closes.

    When the old socket itself holds the port (":8000" → "127.0.0.1:8000":
    without SO_REUSEPORT the kernel refuses the second bind) the old one is
    closed first and the new one bound at once, as a restart would; if that
    fails too, the old one listens again. False when the old one stays.
    """
    old = running.listeners.get(name)
    try:
        listener = await running.start_listener(config)
    except AnubisError as exc:
        if old is None or old.bound is None or old.bound.port != config.bind.port:
            log.error("reload: listener %s not started: %s", name, exc)
            return False
        log.warning("reload: listener %s: %s is held by its own old socket; closing that one first "
                    "(connections arriving meanwhile are refused)", name, config.bind)  # fmt: skip
        old.stop()
        await old.closed.wait()
        try:
            listener = await running.start_listener(config)
        except AnubisError as again:
            log.error("reload: listener %s not started: %s; back on %s", name, again, old.config.bind)
            try:
                running.listeners[name] = await running.start_listener(old.config)
            except AnubisError as lost:  # someone took the port in between: nothing to go back to
                del running.listeners[name]
                log.error("reload: listener %s is closed: %s", name, lost)
            return False
    else:
        if old is not None:
            old.stop()
    running.listeners[name] = listener
    log.info("reload: listener %s on %s", name, listener.bound)
    return True


async def _update_pool(running: Running, pool: Pool, config: PoolConfig) -> None:
    old = pool.config
    pool.config = config
    await running.update_spawner(pool)
    if (config.strategy, config.balance_factor) != (old.strategy, old.balance_factor):
        pool.strategy = make_strategy(config.strategy, config.balance_factor)
    changes = server_changes(pool, config, running.control.members(pool.name))
    await running.resolve(changes.new, pool)  # before the pool changes: it may wait on DNS
    _apply_server_changes(pool, changes, add=True)
    if running.fleet is not None and config.servers_from != old.servers_from:
        running.fleet.sync_pool(pool)
    pool.refresh_faults()
    pool.changed()
    if (config.health, config.discovery, config.resolver) != (old.health, old.discovery, old.resolver):
        running.stop_pool_tasks(pool.name)
        await running.start_pool_tasks(pool)


def _pools_of(config: ListenerConfig) -> set[str]:
    """The pools a listener sends clients to: its own, and its routes'."""
    return {config.pool, *(route.pool for route in config.routes)} - {""}
