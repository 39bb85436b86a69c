"""Toxiproxy's proxies on a running balancer: each one a listener, a one-server pool and its toxics.

Theory of operation: `Proxies` keeps toxiproxy's collection (name → `Proxy`)
and brings the balancer to it through the reload path: every change builds
the whole `Config` (a listener and a pool per enabled proxy, both named
after it) and hands it to `Balancer.apply_config`, which binds and closes
listeners and adds and removes pools while the rest runs. A pool is made
first without its listener, so the proxy's `ToxicSet` is on it before the
first client can arrive (toxics.py reads it from `pool.toxics`); the
listener follows.

The pools are what toxiproxy's proxy does: no health check (a connect that
fails closes the client, as toxiproxy's failed dial does), no retry, no
ejection, and day-long idle timeouts (toxiproxy has none).

What toxiproxy does and this keeps (api.go, proxy.go, proxy_collection.go):
a proxy's `listen` is shown as bound once it listened ("localhost:0" becomes
"127.0.0.1:41234") and as given while it is disabled; a proxy that cannot
bind is not created (500, "listen tcp ADDR: bind: REASON"); disabling,
deleting, or changing `listen` or `upstream` closes its connections;
`populate` checks every entry first, then creates each or replaces one
whose `listen` (resolved) or `upstream` differ, keeping the others and
their toxics, and answers with what it did up to the first failure; `reset`
enables every proxy and removes every toxic. Changes are made one at a
time (a lock), as toxiproxy's mutexes serialise them.

Bind errors are read from the socket opener the balancer is given
(`BindRecorder`), since a reload only logs them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

import trio

from trioanubis.config import Address, Config, ListenerConfig, PoolConfig, parse_address, parse_config
from trioanubis.errors import AnubisError, ConfigError
from trioanubis.proxy.listener import open_listen_socket
from trioanubis.testing.toxics import ApiError, ToxicSet

if TYPE_CHECKING:
    from trioanubis.app import Balancer

log = logging.getLogger("trioanubis.toxiproxy")

# What a proxy's pool is: toxiproxy dials once per client and has no idle timeout.
POOL: Final[Mapping[str, Any]] = {
    "health": {"check": "none"}, "retries": 0, "eject_after": 0, "idle_timeout": "24h",
    "half_close_timeout": "24h",
}  # fmt: skip
DEFAULT_LISTEN: Final = "127.0.0.1:0"
Entry = tuple[str, str, str, bool]  # a proxy to populate: name, listen, upstream, enabled


@final
@dataclass(eq=False, slots=True)
class Proxy:
    """One toxiproxy proxy: what toxiproxy shows of it, and its toxics."""

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: ToxicSet

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "listen": self.listen, "upstream": self.upstream, "enabled": self.enabled,
                "toxics": [toxic.as_json() for toxic in self.toxics]}  # fmt: skip


@final
class BindRecorder:
    """The balancer's socket opener, keeping the last bind error per address for the API's answer."""

    def __init__(self) -> None:
        self.errors: dict[Address, str] = {}

    async def __call__(self, bind: Address, backlog: int) -> socket.socket:
        try:
            sock = await open_listen_socket(bind, backlog)
        except AnubisError as exc:
            reason = str(exc).rpartition(": ")[2]
            self.errors[bind] = f"listen tcp {bind}: bind: {reason[:1].lower()}{reason[1:]}"
            raise
        self.errors.pop(bind, None)
        return sock


@final
class Proxies:
    """Toxiproxy's collection of proxies, carried out on `balancer` (see the module docstring)."""

    def __init__(self, balancer: Balancer, binds: BindRecorder, *, seed: int | None = None) -> None:
        self.balancer = balancer
        self.binds = binds
        self.seed = seed
        self.proxies: dict[str, Proxy] = {}
        self.lock = trio.Lock()

    def get(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ApiError("proxy not found", 404)
        return proxy

    async def create(self, name: str, listen: str, upstream: str, *, enabled: bool = True,
                     seed: int | None = None) -> Proxy:  # fmt: skip
        """A new proxy, listening unless `enabled` is False; 409 for a name taken, 500 when it cannot bind.
        Its draws are seeded with `seed`, else the collection's."""
        async with self.lock:
            if name in self.proxies:
                raise ApiError("proxy already exists", 409)
            proxy = Proxy(name, listen or DEFAULT_LISTEN, upstream, False,
                          ToxicSet(self.seed if seed is None else seed))  # fmt: skip
            if enabled:
                await self._start(proxy)
            self.proxies[name] = proxy
            return proxy

    async def update(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        """Toxiproxy's ProxyUpdate: a new listen or upstream restarts it; `enabled` starts or stops it."""
        async with self.lock:
            proxy = self.get(name)
            if await self._differs(proxy, listen, upstream):
                await self._stop(proxy)
                proxy.listen, proxy.upstream = listen, upstream
            if enabled and not proxy.enabled:
                await self._start(proxy)
            elif not enabled and proxy.enabled:
                await self._stop(proxy)
            return proxy

    async def delete(self, name: str) -> None:
        async with self.lock:
            proxy = self.get(name)
            await self._stop(proxy)
            del self.proxies[name]

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic (500 at the first that cannot listen)."""
        async with self.lock:
            for proxy in list(self.proxies.values()):
                if not proxy.enabled:
                    await self._start(proxy)
                proxy.toxics.clear()

    async def populate(self, entries: list[Entry]) -> tuple[list[Proxy], ApiError | None]:
        """Create or replace each (name, listen, upstream, enabled) in order; what was done, and the error
        that stopped it."""
        done: list[Proxy] = []
        async with self.lock:
            for name, listen, upstream, enabled in entries:
                try:
                    done.append(await self._add_or_replace(name, listen, upstream, enabled))
                except ApiError as exc:
                    return done, exc
        return done, None

    async def close(self) -> None:
        """Close every proxy's connections (the server is stopping)."""
        for proxy in self.proxies.values():
            proxy.toxics.close_all()

    # ------------------------------------------------------------ carrying it out

    async def _add_or_replace(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        existing = self.proxies.get(name)
        if existing is not None:
            if not await self._differs(existing, listen, upstream):
                return existing
            await self._stop(existing)
            del self.proxies[name]
        proxy = Proxy(name, listen or DEFAULT_LISTEN, upstream, False, ToxicSet(self.seed))
        if enabled:
            await self._start(proxy)
        self.proxies[name] = proxy
        return proxy

    async def _differs(self, proxy: Proxy, listen: str, upstream: str) -> bool:
        """Toxiproxy's Differs: the new listen, resolved, is not the proxy's, or the upstream is another."""
        return await resolved(listen) != proxy.listen or upstream != proxy.upstream

    async def _start(self, proxy: Proxy) -> None:
        listener, pool = proxy_configs(proxy)
        await self._apply({proxy.name: pool}, {})
        self.balancer.pools[proxy.name].toxics = proxy.toxics
        proxy.toxics.enabled = True
        await self._apply({proxy.name: pool}, {proxy.name: listener})
        running = self.balancer.listeners.get(proxy.name)
        if running is None or running.bound is None:
            await self._apply({}, {})
            proxy.toxics.enabled = False
            error = self.binds.errors.get(listener.bind, f"listen tcp {listener.bind}: cannot listen")
            raise ApiError(error, 500)
        proxy.listen = str(running.bound)
        proxy.enabled = True
        log.info("toxiproxy: proxy %s listens on %s for %s", proxy.name, proxy.listen, proxy.upstream)

    async def _stop(self, proxy: Proxy) -> None:
        if not proxy.enabled:
            return
        proxy.enabled = False
        proxy.toxics.enabled = False
        await self._apply({}, {}, without=proxy.name)
        proxy.toxics.close_all()
        log.info("toxiproxy: proxy %s stopped", proxy.name)

    async def _apply(self, pools: dict[str, PoolConfig], listeners: dict[str, ListenerConfig],
                     *, without: str = "") -> None:  # fmt: skip
        """Bring the balancer to the enabled proxies (but `without`), plus `pools` and `listeners`."""
        for proxy in self.proxies.values():
            if proxy.enabled and proxy.name != without and proxy.name not in pools:
                listeners[proxy.name], pools[proxy.name] = proxy_configs(proxy)
        running = self.balancer.config
        config = Config(listeners, pools, running.settings, running.admin, running.source)
        await self.balancer.apply_config(config)


def proxy_configs(proxy: Proxy) -> tuple[ListenerConfig, PoolConfig]:
    """The listener and pool `proxy` is; 400 naming the field for a listen or upstream we cannot take."""
    for field, value in (("listen", proxy.listen), ("upstream", proxy.upstream)):
        try:
            parse_address(value, allow_any_host=field == "listen")
        except ValueError as exc:
            raise ApiError(f"bad request body: {field}: {exc}, got {value!r}", 400) from None
    data = {"listeners": {proxy.name: {"bind": proxy.listen, "pool": proxy.name}},
            "pools": {proxy.name: {"servers": [proxy.upstream], **POOL}}}  # fmt: skip
    try:
        config = parse_config(data, f"proxy {proxy.name!r}")
    except ConfigError as exc:
        raise ApiError(f"bad request body: {exc}", 400) from None
    return config.listeners[proxy.name], config.pools[proxy.name]


async def resolved(listen: str) -> str:
    """`listen` as a bound socket would show it ("localhost:7070" → "127.0.0.1:7070"), IPv4 first."""
    try:
        address = parse_address(listen or DEFAULT_LISTEN, allow_any_host=True)
        infos = await trio.socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        raise ApiError(f"listen tcp {listen}: {exc}", 500) from None
    *_, sockaddr = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    return str(Address(str(sockaddr[0]), int(sockaddr[1])))
