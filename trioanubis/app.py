"""The root of the nursery tree: pools, health checks, listeners, connections, admin, reload.

Theory of operation — the tree `Balancer.run` builds:

    root nursery
    ├── admin endpoint (if [admin])                        admin.py
    ├── scope per pool with spawn: its replicas             spawn.py
    ├── scope per pool: DNS discovery (one task per entry)  discovery.py
    │                   health checks (one task per server) health/checker.py
    ├── timer: every connection's connect/idle timeouts     timeouts.py
    ├── readiness: advances relays, wakes parked tasks     proxy/io/
    ├── reloader: applies SIGHUP / --watch reloads one at a time
    ├── connections nursery                                (outlives the listeners)
    │   └── one task per connection: connect, then relay   connection.py, relay.py
    │       (epoll: both directions in that task; portable, TLS, faults: a nursery of its own)
    └── accept nursery: one task per listener              listener.py

Start-up resolves server names, runs every pool's first health round, then
binds the listeners and reports their addresses through `task_status`, so no
client is ever sent to a server that has not been checked.

Shutdown is cancellation. `shutdown()` first keeps accepting for
`shutdown_delay` while `is_ready()` says no (an orchestrator takes a moment
to stop sending new connections; a sidecar's application is still finishing
its requests), then closes the listeners (their accept tasks are cancelled
and close their sockets), lets open connections run for up to
`drain_timeout`, then cancels the connections nursery and the rest of the
tree. Calling it a second time cancels everything at once. After an upgrade
handed the sockets to a new process (upgrade.py), `shutdown(delay=False)`
skips the delay and `stop_admin()` closes the admin endpoint at once.

Garbage collection (`settle_gc`, once the listeners are bound): what start-up
built lives as long as the process, so it is frozen out of the cyclic
collector's walks, and generation 0 is collected every `GC_GEN0_THRESHOLD`
net allocations instead of 700: a connection's objects are acyclic and freed
by reference counting, so frequent young collections found nothing to free.
`settle()` does this and swaps Trio's instrument table for one whose checks
are dict lookups (proxy/io/instruments.py).

Runtime changes (`command`): every change an operator makes (drain, enable,
weight, faults, a server added or removed) is a command (control.py) that
`self.control` applies to the pools, one change at a time (`_changes`, which
a reload takes too). A server added is resolved first, without blocking the
loop; a server removed takes no new connection at once and leaves when its
last one ends, or `drain_timeout` later, when what is still open is cut. With
`[settings] state_file` the commands in effect are written (state_file.py)
after each change and applied at the next start before anything serves,
the admin endpoint included.

Reload (`apply_config`, from SIGHUP, `anubis reload` or `--watch`): reload.py
decides and carries it out; this module offers it the plumbing (start a
listener, a pool's tasks, its replicas, in this tree). Connections never
belong to a listener or a pool's list, only to the connections nursery, so a
reload never cuts one: a removed server keeps its connections until they end.
The admin endpoint takes a new token at once; a new admin bind waits for a
restart.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import trio

from trioanubis.config import Address, Config, ListenerConfig, load_config
from trioanubis.control import AddServer, Command, CommandError, Control, RemoveServer, named
from trioanubis.discovery import run_discovery
from trioanubis.errors import AnubisError, ConfigError
from trioanubis.health.checker import run_health_checks
from trioanubis.ops import systemd
from trioanubis.ops.accesslog import AccessLog
from trioanubis.ops.admin import Admin, AdminOpener
from trioanubis.pool import Pool, Server
from trioanubis.proxy.io import open_readiness
from trioanubis.proxy.io.instruments import quicken_instruments
from trioanubis.proxy.lifecycle import Limits
from trioanubis.proxy.listener import Listener, SocketOpener
from trioanubis.proxy.timeouts import Timer, tick_for
from trioanubis.reload import apply_config
from trioanubis.resolve import resolve_address
from trioanubis.spawn import Spawner
from trioanubis.state_file import StateError, parse_state, read_state, state_document, write_state
from trioanubis.watch import files_read_by, signatures, watch_files

if TYPE_CHECKING:
    from trioanubis.fleet.fleet import Fleet

log = logging.getLogger("trioanubis")

# File descriptors kept back from the process-wide connection limit for
# listeners, health checks, the admin endpoint and logging.
RESERVED_FDS: Final = 64
# Net allocations between generation-0 collections (CPython's default: 700). The
# data path's objects die by reference counting; a young collection every ~25
# connections cost about 3 % of the CPU and freed nothing (bench/README.md).
GC_GEN0_THRESHOLD: Final = 50_000

# How long a command waits for a new server's name to resolve: the admin's answer waits for it
# (in every worker too, within the supervisor's 5 s for confirmations); a slower name is left to
# the health checks, which resolve a server that has no address before each probe.
RESOLVE_TIMEOUT: Final = 2.0

# What keeps a pool's servers' state current: started() once the first
# verdicts are in. The default probes them; a worker follows its supervisor.
HealthRunner = Callable[..., Awaitable[None]]


def fd_connection_limit() -> int:
    """How many proxied connections fit in RLIMIT_NOFILE (two descriptors each)."""
    try:
        import resource  # Unix only
    except ImportError:  # Windows: no descriptor limit of this kind
        return 1 << 20
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft - RESERVED_FDS) // 2)


@final
class Balancer:
    """The running balancer: its pools, listeners and the scopes that stop them."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        watch: bool = False,
        io: str = "",
        open_socket: SocketOpener | None = None,
        open_admin: AdminOpener | None = None,
        health: HealthRunner = run_health_checks,
        shared_state: bool = True,
    ) -> None:
        self.config = config
        self.io = io  # `--io`: wins over [settings] io for the life of the process
        self._open_socket = open_socket
        self._health = health
        self.config_path = config_path
        self.watch = watch
        # What the config file and the files it reads looked like when it was loaded (just before
        # this): --watch compares against it, so a change made before its first look is not missed.
        self._files_seen = signatures(self._watched()) if watch else {}
        self.pools: dict[str, Pool] = {name: Pool(pc) for name, pc in config.pools.items()}
        self.control = Control(self.pools)  # the operator's commands (control.py)
        self._changes = trio.Lock()  # one change at a time: a command, a reload
        self._state_saved = (0, "")  # (control.version, path) the state file holds
        self.access = AccessLog(enabled=config.settings.access_log)
        self.limits = Limits(self.connection_limit(config))
        self.timer = Timer(self.tick_for(config))
        self.poller = open_readiness(io or config.settings.io)
        self.listeners: dict[str, Listener] = {
            name: self._new_listener(lc) for name, lc in config.listeners.items()
        }
        self.admin = Admin(self, config.admin, open_admin) if config.admin is not None else None
        self._admin_scope = trio.CancelScope()
        self.admin_address: Address | None = None
        self.listening = False
        self.draining = False
        self.reloads = 0  # applied
        self.reload_failures = 0
        self.stopped = trio.Event()  # set once run() has returned
        self._shutdown = trio.Event()
        self._delay_shutdown = True
        self._pool_scopes: dict[str, trio.CancelScope] = {}
        self.spawners: dict[str, Spawner] = {}  # pools that run their replicas
        self._spawn_scopes: dict[str, trio.CancelScope] = {}
        self._reload_requests, self._reload_queue = trio.open_memory_channel[str](1)
        self._root: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._accepting: trio.Nursery | None = None
        # How a command from the fleet's etcd is applied: here, or by the workers' supervisor (which
        # replaces it), never written back.
        self.apply_shared: Callable[[Command], Awaitable[object]] = functools.partial(self.command,
                                                                                      publish=False)
        self.fleet = self._new_fleet(config, shared_state)

    def _new_fleet(self, config: Config, shared: bool) -> Fleet | None:
        """The fleet task's state (fleet/): with [cluster], for shared state (`shared`: this process has
        the admin) or for a pool's servers from etcd (a worker)."""
        cluster = config.cluster
        if cluster is None or not (shared or any(p.servers_from for p in config.pools.values())):
            return None
        from trioanubis.fleet.fleet import Fleet  # the etcd client: imported only by who needs it

        return Fleet(cluster, self.pools, lambda command: self.apply_shared(command), shared=shared,
                     admin=lambda: str(self.admin_address or ""))  # fmt: skip

    def cluster_stats(self) -> dict[str, Any] | None:
        """The fleet's part of /stats and /metrics: None unless this process speaks for the fleet."""
        return self.fleet.status() if self.fleet is not None and self.fleet.shared else None

    def fleet_document(self) -> dict[str, Any] | None:
        """GET /fleet: the instances and where they disagree; None without [cluster]."""
        return self.fleet.document() if self.fleet is not None and self.fleet.shared else None

    def _new_listener(self, config: ListenerConfig) -> Listener:
        return Listener(config, self.pools, self.limits, self.access.log, self.timer, self.poller,
                        self._open_socket)  # fmt: skip

    @staticmethod
    def tick_for(config: Config) -> float:
        return tick_for(
            t
            for pc in config.pools.values()
            for t in (pc.connect_timeout, pc.idle_timeout, pc.half_close_timeout, pc.failover_timeout)
        )

    def connection_limit(self, config: Config) -> int:
        derived = fd_connection_limit()
        wanted = config.settings.max_connections
        listener_total = sum(lc.max_connections for lc in config.listeners.values())
        for what, value in (("settings.max_connections", wanted),
                            ("the listeners' max_connections together", listener_total)):  # fmt: skip
            if value > derived:
                log.warning("%s: %s = %d exceeds the %d connections the file-descriptor limit "
                            "allows (ulimit -n); the lower figure applies",
                            config.source, what, value, derived)  # fmt: skip
        return min(wanted, derived) if wanted else derived

    @property
    def endings(self) -> dict[str, int]:
        """Connections ended so far, by end state (the access log counts them)."""
        return self.access.counts

    def is_ready(self) -> bool:
        """Listeners bound and not draining: this balancer takes clients, whatever its servers (/readyz)."""
        return self.listening and not self.draining

    def has_upstream(self) -> bool:
        """Every pool has a server to send clients to (/readyz?upstream=1 asks this too)."""
        return all(pool.candidates() for pool in self.pools.values())

    # ------------------------------------------------------------------ run

    async def run(
        self, *, task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `shutdown()` has drained; started() with each listener's bound address."""
        try:
            await self._run(task_status)
        finally:
            self.poller.shut_down()  # every connection has closed: nothing uses it any more
            self.listening = False
            self._remove_pid_file()
            self.stopped.set()

    async def _run(self, task_status: trio.TaskStatus[Mapping[str, Address]]) -> None:
        async with trio.open_nursery() as root:
            self._root = root
            root.start_soon(self.timer.run)
            root.start_soon(self.poller.run)
            try:
                await self._serve(root, task_status)
            finally:
                for listener in self.listeners.values():
                    listener.close_unserved()
            root.cancel_scope.cancel()

    async def _serve(self, root: trio.Nursery, task_status: trio.TaskStatus[Mapping[str, Address]]) -> None:
        """Bind, start the pools, accept; on shutdown stop accepting, drain, and return."""
        for listener in self.listeners.values():  # first: no replica port can take a listener's
            await listener.bind()
        await self._load_state()  # before anything serves, the admin endpoint included
        if self.fleet is not None:  # the fleet's servers and drains, before anything serves too
            await root.start(self.fleet.run)
        if self.admin is not None:
            self.admin_address = await root.start(self._serve_admin)
        for pool in self.pools.values():
            await self.resolve(pool.servers, pool)
            await self.update_spawner(pool)
            await self.start_pool_tasks(pool)
        async with trio.open_nursery() as connections:
            self._connections = connections
            async with trio.open_nursery() as accepting:
                self._accepting = accepting
                bound = {
                    name: await accepting.start(listener.serve, connections)
                    for name, listener in self.listeners.items()
                }
                self.listening = True
                self._write_pid_file()
                task_status.started(bound)
                root.start_soon(self._reload_loop)
                if self.watch and self.config_path:
                    root.start_soon(watch_files, self._watched, self._files_seen, self.request_reload)
                await self._shutdown.wait()
                await self._keep_accepting()
                self.limits.draining = True
                for listener in self.listeners.values():
                    listener.stop()
                accepting.cancel_scope.cancel()
            await self._drain()
            connections.cancel_scope.cancel()

    async def resolve(self, servers: list[Server], pool: Pool) -> None:
        for server in servers:
            try:
                pool.set_addresses(server, await resolve_address(server.address))
            except OSError as exc:
                log.warning("pool %s: cannot resolve server %s (%s): %s; will retry",
                            pool.name, server.name, server.address.host, exc)  # fmt: skip

    def stop_pool_tasks(self, name: str) -> None:
        """Stop a pool's discovery and health checks (a reload removed them or changed them)."""
        self._pool_scopes.pop(name).cancel()

    async def start_pool_tasks(self, pool: Pool) -> None:
        """Discovery and health checks of `pool`, in one scope; returns after their first rounds."""
        assert self._root is not None
        scope = trio.CancelScope()
        self._pool_scopes[pool.name] = scope
        nameserver = pool.config.resolver or self.config.settings.resolver

        async def pool_tasks(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for entry in pool.config.discovery:
                        await nursery.start(run_discovery, pool, entry, nameserver)
                    await nursery.start(self._health, pool)
                    task_status.started()

        await self._root.start(pool_tasks)

    async def _serve_admin(self, task_status: trio.TaskStatus[Address]) -> None:
        assert self.admin is not None
        with self._admin_scope:
            await self.admin.serve(task_status=task_status)

    def stop_admin(self) -> None:
        """Close the admin endpoint now (a new process took its sockets over)."""
        self._admin_scope.cancel()

    async def _keep_accepting(self) -> None:
        """`shutdown_delay`: accept on, not ready, before the listeners close (a 2nd stop cuts it short)."""
        delay = self.config.settings.shutdown_delay if self._delay_shutdown else 0.0
        if delay > 0:
            log.info("stopping: accepting for another %gs (shutdown_delay) while not ready", delay)
            await trio.sleep(delay)

    async def _drain(self) -> None:
        active = self.limits.active
        if not active:
            return
        timeout = self.config.settings.drain_timeout
        log.info("draining %s for up to %gs", _open_connections(active), timeout)
        with trio.move_on_after(timeout):
            await self.limits.wait_idle()
            return
        log.warning("drain timeout: resetting %s", _open_connections(self.limits.active))

    def shutdown(self, *, delay: bool = True) -> None:
        """Stop accepting (after `shutdown_delay` unless `delay` is False) and drain; a second call
        cancels everything at once."""
        if self.draining:
            log.warning("second stop request: resetting every connection now")
            if self._root is not None:
                self._root.cancel_scope.cancel()
            return
        self.draining = True
        self._delay_shutdown = delay
        self._shutdown.set()

    # ------------------------------------------------------- runtime changes

    async def command(self, command: Command, *, publish: bool = True) -> Server:
        """Carry out one operator command (control.py) and keep it in the state file; the server it
        concerns. Raises CommandError: 404 for a pool or server that does not exist, 409 for a
        conflict (a name taken), and nothing is changed then. In a fleet, unless `publish` is False
        (a command that came from etcd), it is then queued for etcd (fleet/fleet.py).

        One change at a time: an added server's address is resolved first (in
        a worker thread, as getaddrinfo blocks; a name that does not resolve is
        logged and left to its health checks), then the command applies in one
        step. A removed server's connections still open `drain_timeout` later
        are cut.
        """
        async with self._changes:
            self.control.check(command)
            sockaddrs = await self._addresses_of(command)
            server = self.control.apply(command, sockaddrs)
            if isinstance(command, RemoveServer) and server.active and self._root is not None:
                self._root.start_soon(self._cut_after_drain, self.pools[command.pool], server)
            await self.save_state()
        if publish and self.fleet is not None and self.fleet.shared:
            self.fleet.publish(named(command, server.name))
        return server

    async def _addresses_of(self, command: Command) -> list[tuple[int, tuple[object, ...]]] | None:
        if not isinstance(command, AddServer):
            return None
        address = command.entry.address
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                return await resolve_address(address)
        except (OSError, trio.TooSlowError) as exc:
            why = exc if isinstance(exc, OSError) else f"no answer in {RESOLVE_TIMEOUT:g}s"
            log.warning("pool %s: cannot resolve server %s (%s): %s; will retry", command.pool,
                        command.entry.name, address.host, why)  # fmt: skip
            return None

    async def _cut_after_drain(self, pool: Pool, server: Server) -> None:
        """`drain_timeout` after its removal, cut what `server` still carries."""
        await trio.sleep(self.config.settings.drain_timeout)
        if server not in pool.retired:
            return
        cut = [conn for conn in self.timer.connections if conn.picked is server]
        for conn in cut:
            conn.end_with("shutdown")
        log.warning("pool %s: server %s removed %gs ago (drain_timeout): %s cut", pool.name, server.name,
                    self.config.settings.drain_timeout, _open_connections(len(cut)))  # fmt: skip

    def restore(self, commands: list[Command], where: str) -> int:
        """Apply `commands` before this balancer serves (the state file, a worker's start); what no
        longer matches the config is skipped, one log line each. How many applied."""
        applied = 0
        for command in commands:
            try:
                self.control.apply(command)
            except CommandError as exc:
                log.warning("%s: %s; skipped", where, exc)
            else:
                applied += 1
        return applied

    async def _load_state(self) -> None:
        """Apply the state file's commands; a file that is unreadable or not ours is one log line."""
        path = self.config.settings.state_file
        if not path:
            return
        try:
            raw = await trio.to_thread.run_sync(read_state, path)
            commands = [] if raw is None else parse_state(raw, self.config.source)
        except (OSError, StateError) as exc:
            why = exc.strerror or exc if isinstance(exc, OSError) else exc
            log.error("state_file %s: %s; ignored: starting from the config alone", path, why)
            return
        if raw is None:
            log.info("state_file %s: none yet (written at start and after each runtime change)", path)
        else:
            applied = self.restore(commands, f"state_file {path}")
            log.info("state_file %s: %d of %d runtime changes applied", path, applied, len(commands))
        await self.save_state()

    async def save_state(self) -> None:
        """Write the commands in effect to the state file, if set and if they changed since."""
        path = self.config.settings.state_file
        done = (self.control.version, path)
        if not path or done == self._state_saved:
            return
        data = state_document(self.control.in_effect(), self.config.source)
        try:
            await trio.to_thread.run_sync(write_state, path, data)
        except OSError as exc:
            log.error("state_file %s: cannot write it (%s): the change is in effect, a restart would "
                      "forget it", path, exc.strerror or exc)  # fmt: skip
            return
        self._state_saved = done

    # ------------------------------------------------------------ pid file

    def _write_pid_file(self) -> None:
        path = self.config.settings.pid_file
        if path:
            try:
                Path(path).write_text(f"{os.getpid()}\n")
            except OSError as exc:
                raise AnubisError(f"writing pid_file {path}: {exc.strerror or exc}") from None

    def _remove_pid_file(self) -> None:
        path = self.config.settings.pid_file
        if path:
            try:
                if Path(path).read_text().strip() == str(os.getpid()):
                    Path(path).unlink()
            except OSError:
                pass

    # -------------------------------------------------------------- reload

    def request_reload(self, reason: str) -> None:
        """Ask for the config file to be read again (coalesced if one is pending)."""
        with contextlib.suppress(trio.WouldBlock):
            self._reload_requests.send_nowait(reason)

    async def _reload_loop(self) -> None:
        async for reason in self._reload_queue:
            if not self.config_path:
                log.warning("reload (%s) ignored: not running from a config file", reason)
                continue
            log.info("reloading %s (%s)", self.config_path, reason)
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
            try:
                config = await trio.to_thread.run_sync(load_config, self.config_path)
            except ConfigError as exc:
                self.reload_failures += 1
                log.error("reload rejected, the running config stays: %s", exc)
                systemd.notify("READY=1", "STATUS=reload rejected, the running config stays")
                continue
            await self.apply_config(config)
            systemd.notify("READY=1", f"STATUS=reloaded ({self.reloads} applied, "
                                      f"{self.reload_failures} failed)")  # fmt: skip

    def _watched(self) -> list[str]:
        """What --watch looks at: the config file and the files the running config read."""
        return [self.config_path, *files_read_by(self.config)] if self.config_path else []

    async def apply_config(self, new: Config) -> None:
        """Bring the running balancer to `new` without touching established connections (reload.py plans);
        what the operator changed at runtime meets the new file (control.py `reconcile`)."""
        async with self._changes:
            await apply_config(self, new)
            await self.save_state()

    async def start_listener(self, config: ListenerConfig) -> Listener:
        listener = self._new_listener(config)
        assert self._accepting is not None and self._connections is not None
        await self._accepting.start(listener.serve, self._connections)
        return listener

    async def update_spawner(self, pool: Pool) -> None:
        """Start, change (a roll) or stop the replicas of `pool` to match its config."""
        spawn, drain = pool.config.spawn, self.config.settings.drain_timeout
        spawner = self.spawners.get(pool.name)
        if spawn is None:
            self.stop_spawner(pool.name)
            return
        if spawner is not None:
            spawner.apply(spawn, drain)
            return
        assert self._root is not None
        spawner = self.spawners[pool.name] = Spawner(pool, spawn, drain)
        scope = self._spawn_scopes[pool.name] = trio.CancelScope()

        async def run_spawner(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await spawner.run(task_status=task_status)

        await self._root.start(run_spawner)

    def stop_spawner(self, name: str) -> None:
        """Stop a pool's replicas (their servers leave the pool at its next update)."""
        if name in self.spawners:
            del self.spawners[name]
            self._spawn_scopes.pop(name).cancel()
            log.warning("pool %s: replicas stopped", name)

def _open_connections(count: int) -> str:
    return f"{count} open connection{'' if count == 1 else 's'}"


def settle_gc() -> None:
    """Once started: freeze what start-up built out of the collector's walks, and collect young less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


def settle() -> None:
    """Once started, in the process that serves: `settle_gc`, and Trio's instrument checks as dict
    lookups (proxy/io/instruments.py)."""
    settle_gc()
    quicken_instruments()


async def run_until_signalled(
    balancer: Balancer,
    *,
    upgrade: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `balancer`: SIGTERM/SIGINT stop it gracefully (a second one: at once), SIGHUP reloads,
    SIGUSR2 runs `upgrade`."""
    await run_with_signals(balancer.run, balancer.request_reload, balancer.shutdown, upgrade=upgrade,
                           task_status=task_status)  # fmt: skip


async def run_with_signals(
    run: Callable[..., Awaitable[None]],
    reload: Callable[[str], None],
    stop: Callable[[], None],
    *,
    upgrade: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `run(task_status=...)` while SIGTERM/SIGINT call `stop`, SIGHUP calls `reload` and SIGUSR2
    starts `upgrade` (in a task of its own; upgrade.py).

    The balancer and the worker supervisor both stop this way; Windows has no
    SIGHUP (reload there with --watch) and no SIGUSR2.
    """
    reload_signals = [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []
    upgrade_signals = [signal.SIGUSR2] if hasattr(signal, "SIGUSR2") else []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *reload_signals,
                                   *upgrade_signals) as signals:  # fmt: skip
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if signum in reload_signals:
                        reload("SIGHUP")
                    elif signum in upgrade_signals:
                        if upgrade is None:
                            log.warning("received SIGUSR2: this command does not upgrade; ignored")
                        else:
                            nursery.start_soon(upgrade)
                    else:
                        log.info("received %s", signal.Signals(signum).name)
                        systemd.notify("STOPPING=1", "STATUS=stopping: draining open connections")
                        stop()

            nursery.start_soon(watch)
            await run(task_status=task_status)
            nursery.cancel_scope.cancel()
