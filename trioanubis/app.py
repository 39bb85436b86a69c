"""The root of the nursery tree: pools, health checks, listeners, connections, shutdown.

Theory of operation — the tree `Balancer.run` builds:

    root nursery
    ├── health nursery per pool (one task per server)     health/checker.py
    ├── connections nursery                                (outlives the listeners)
    │   └── one task per connection → relay nursery        connection.py, relay.py
    │       ├── pump client → server
    │       └── pump server → client
    └── accept nursery: one task per listener              listener.py

Start-up resolves server names, runs every pool's first health round, then
binds the listeners and reports their addresses through `task_status`, so no
client is ever sent to a server that has not been checked.

Shutdown is cancellation. `shutdown()` closes the listeners at once (their
accept tasks are cancelled and close their sockets), lets open connections
run for up to `drain_timeout`, then cancels the connections nursery and the
rest of the tree. Calling it a second time cancels everything at once.
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Mapping
from typing import Final, final

import trio

from trioanubis.accesslog import AccessLog
from trioanubis.config import Address, Config
from trioanubis.health.checker import run_health_checks
from trioanubis.listener import Limits, Listener
from trioanubis.pool import Pool
from trioanubis.resolve import resolve_address

log = logging.getLogger("trioanubis")

# File descriptors kept back from the process-wide connection limit for
# listeners, health checks, the admin endpoint and logging.
RESERVED_FDS: Final = 64


def fd_connection_limit() -> int:
    """How many proxied connections fit in RLIMIT_NOFILE (two descriptors each)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft - RESERVED_FDS) // 2)


@final
class Balancer:
    """The running balancer: its pools, listeners and the scopes that stop them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[str, Pool] = {name: Pool(pc) for name, pc in config.pools.items()}
        self.access = AccessLog(enabled=config.settings.access_log)
        self.limits = Limits(self._connection_limit(config))
        self.listeners: dict[str, Listener] = {
            name: Listener(lc, self.pools[lc.pool], self.limits, self.access)
            for name, lc in config.listeners.items()
        }
        self.draining = False
        self.ready = False
        self._shutdown = trio.Event()
        self.stopped = trio.Event()  # set once run() has returned
        self._root: trio.CancelScope | None = None

    @staticmethod
    def _connection_limit(config: Config) -> int:
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

    async def run(
        self, *, task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `shutdown()` has drained; started() with each listener's bound address."""
        try:
            await self._run(task_status)
        finally:
            self.ready = False
            self.stopped.set()

    async def _run(self, task_status: trio.TaskStatus[Mapping[str, Address]]) -> None:
        async with trio.open_nursery() as root:
            self._root = root.cancel_scope
            await self._resolve_servers()
            for pool in self.pools.values():
                await root.start(run_health_checks, pool)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    bound = {
                        name: await accepting.start(listener.serve, connections)
                        for name, listener in self.listeners.items()
                    }
                    self.ready = True
                    task_status.started(bound)
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()

    async def _resolve_servers(self) -> None:
        for pool in self.pools.values():
            for server in pool.servers:
                try:
                    server.sockaddrs = await resolve_address(server.address)
                except OSError as exc:
                    log.warning("pool %s: cannot resolve server %s (%s): %s; will retry",
                                pool.name, server.name, server.address.host, exc)  # fmt: skip

    async def _drain(self) -> None:
        active = self.limits.active
        if not active:
            return
        timeout = self.config.settings.drain_timeout
        log.warning("draining %d open connections for up to %gs", active, timeout)
        with trio.move_on_after(timeout):
            for listener in self.listeners.values():
                await listener.wait_idle()
            return
        log.warning("drain timeout: closing %d connections", self.limits.active)

    def shutdown(self) -> None:
        """Stop accepting and drain; a second call cancels everything at once."""
        if self.draining:
            log.warning("second stop request: closing every connection now")
            if self._root is not None:
                self._root.cancel()
            return
        self.draining = True
        self.ready = False
        for listener in self.listeners.values():
            listener.draining = True
        self._shutdown.set()


async def run_until_signalled(
    balancer: Balancer,
    *,
    task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `balancer`, turning SIGTERM/SIGINT into a graceful stop (a second one: at once)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.warning("received %s", signal.Signals(signum).name)
                    balancer.shutdown()

            nursery.start_soon(watch)
            await balancer.run(task_status=task_status)
            nursery.cancel_scope.cancel()
