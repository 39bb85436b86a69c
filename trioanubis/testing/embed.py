"""Embedding the balancer in a Trio program: `open_balancer` and the handle it yields.

Theory of operation: `open_balancer` builds a `Balancer` from a config (TOML
text, a path, a dict of the TOML's shape, or a `Config`), starts its `run`
in a nursery of the caller's tree (`nursery.start`, so the listeners are
bound when the `async with` body begins), yields a `BalancerHandle`, and on
exit stops it as SIGTERM would without the delay: the listeners close and
open connections get `drain_timeout` to finish. An exception out of the body
cancels everything at once instead.

Nothing is process-wide: every balancer has its own pools, listeners,
Timer, readiness backend (and its read buffer) and access-log counters, so
two of them in one Trio run, or in two threads each with its own Trio run,
share no mutable state. Logging goes through `logging` (the process's
handlers), unless the program configured anubis's own writer.

The readiness backend is `io` when given, else the config's `[settings] io`;
"auto" there means epoll where the platform has it, portable elsewhere.
The `ANUBIS_IO` environment variable, which `anubis run` honours, is not
read: an embedding program says what it wants.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, final

import trio

import trioanubis.testing.controls as controls
from trioanubis.app import Balancer
from trioanubis.config import (
    Address,
    Config,
    FaultConfig,
    epoll_available,
    load_config,
    parse_config,
    parse_config_text,
)

ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | Config


def load(config: ConfigSource) -> Config:
    """A `Config` from what `open_balancer` takes: a str with a newline or "=" is TOML text, any
    other str or path names a file, a mapping is the TOML's shape; ConfigError naming the key."""
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return parse_config(config, "open_balancer")
    if isinstance(config, str) and ("\n" in config or "=" in config):
        return parse_config_text(config, "open_balancer")
    return load_config(os.fspath(config))


def io_backend(io: str | None, config: Config | None) -> str:
    """The readiness backend to build: `io`, else the config's (if any); "auto" resolved here, never
    from the environment."""
    wanted = io or (config.settings.io if config is not None else "auto")
    if wanted == "auto":
        return "epoll" if epoll_available() else "portable"
    return wanted


@final
class BalancerHandle:
    """A running embedded balancer: where it listens, and its runtime controls."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer

    @property
    def addresses(self) -> Mapping[str, Address]:
        """Each listener's bound address (the port it got when the config asked for port 0)."""
        return {name: listener.bound for name, listener in self._balancer.listeners.items()
                if listener.bound is not None}  # fmt: skip

    def address(self, listener: str | None = None) -> Address:
        """A listener's bound address; without a name, the only (or first) listener's."""
        addresses = self.addresses
        if listener is None:
            return next(iter(addresses.values()))
        if listener not in addresses:
            raise LookupError(f"no listener {listener!r} (listeners: {', '.join(addresses) or 'none'})")
        return addresses[listener]

    @property
    def endings(self) -> Mapping[str, int]:
        """Connections ended so far, by end state (client_eof, server_reset, fault_reset, ...)."""
        return dict(self._balancer.endings)

    @property
    def active(self) -> int:
        """Connections open now."""
        return self._balancer.limits.active

    async def drain(self, pool: str, server: str) -> None:
        """No new connections to `server` (a name or "host:port"); open ones go on."""
        await controls.drain(self._balancer, pool, server)

    async def enable(self, pool: str, server: str) -> None:
        await controls.enable(self._balancer, pool, server)

    async def set_weight(self, pool: str, server: str, weight: int) -> None:
        await controls.set_weight(self._balancer, pool, server, weight)

    async def set_faults(
        self, pool: str, server: str, faults: Mapping[str, Any] | FaultConfig | None
    ) -> None:
        """Replace a server's `[faults]` table (e.g. {"latency": "100ms"}) for its new connections;
        None clears it."""
        await controls.set_faults(self._balancer, pool, server, faults)

    async def add_server(self, pool: str, address: str, *, name: str = "", weight: int = 1) -> None:
        await controls.add_server(self._balancer, pool, address, name=name, weight=weight)

    async def remove_server(self, pool: str, server: str) -> None:
        await controls.remove_server(self._balancer, pool, server)

    async def reload(self, config: ConfigSource) -> None:
        """Bring the balancer to a new config, as SIGHUP does (open connections are not touched)."""
        await self._balancer.apply_config(load(config))


@asynccontextmanager
async def open_balancer(config: ConfigSource, *, io: str | None = None) -> AsyncIterator[BalancerHandle]:
    """Run a balancer for `config` in the caller's Trio tree while the `async with` body runs.

    Its listeners are bound when the body starts (`handle.address()`); leaving
    the body stops accepting and drains open connections for `drain_timeout`;
    an exception out of the body cancels them at once. A bad config raises
    `ConfigError` (naming the key) before anything starts, a port in use
    `AnubisError`.
    """
    loaded = load(config)
    balancer = Balancer(loaded, io=io_backend(io, loaded))
    failed: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        try:
            yield BalancerHandle(balancer)
        except Exception as exc:  # raised as it is, after the tree stopped (not in an exception group)
            failed = exc
            nursery.cancel_scope.cancel()
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        else:
            balancer.shutdown(delay=False)
    if failed is not None:
        raise failed
