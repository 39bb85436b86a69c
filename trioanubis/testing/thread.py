"""Fault-injecting proxies for sync and asyncio code: a balancer in a thread of its own.

Theory of operation: a `Kit` starts one thread that runs its own Trio loop
(`trio.run`) and, in it, a balancer with no listener (toxiproxy.py's
`toxiproxy_balancer` without its API) and a `Proxies` collection. The
caller's thread never touches the balancer: every call of a `ProxyHandle`
is sent to the loop (`trio.from_thread.run`) and waits for its answer, so
the toxics change only in the balancer's thread, as everywhere else, and a
call returns once its change is in force (a toxic added acts on the next
bytes of the connections already open). Errors raised there (a bad fault
value, a port in use) are raised in the caller.

Closing the kit (leaving its `with`) closes every proxy's connections,
stops the balancer and joins the thread. Two kits, in one thread or two,
share nothing: each has its own balancer, loop and random draws.

`proxy(upstream, **faults)` is the short way for one proxy:

    with trioanubis.testing.proxy("127.0.0.1:6379", latency="100ms") as p:
        client = redis.Redis(p.host, p.port)

Faults are the `[faults]` table's keys and values (`latency="100ms"`,
`jitter="10ms"`, `bandwidth="1MB/s"`, `close_after="64KiB"`,
`reset_after=...`, `blackhole=True`, `refuse=True`, `slice=...`,
`slice_delay=...`, `direction="upstream"`, `probability=0.5`), plus
`timeout`, `reset_peer`, `slow_close` (toxiproxy's) and `cut_after` (bytes
flow, then the connection closes), each a duration. Unlike a config's
table they act on open connections too (refuse acts on connects).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar, final

import trio

import trioanubis.testing.controls as controls
from trioanubis.config import Address, FaultConfig, parse_duration, parse_faults
from trioanubis.config.faults import FAULT_KEYS
from trioanubis.config.values import DAY
from trioanubis.testing.embed import io_backend
from trioanubis.testing.proxies import Proxies, Proxy
from trioanubis.testing.toxics import TIMED, ApiError, Toxic, fault_toxics, parse_toxic

T = TypeVar("T")
# How long starting or stopping the kit's thread may take before it is an error.
START_TIMEOUT: Final = 30.0


@final
class Kit:
    """A balancer running in a thread of its own, holding proxies (see the module docstring)."""

    def __init__(self, *, io: str | None = None, seed: int | None = None) -> None:
        self.io = io
        self.seed = seed
        self._token: trio.lowlevel.TrioToken | None = None
        self._proxies: Proxies | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._names = itertools.count(1)

    def __enter__(self) -> Kit:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trioanubis-kit", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the trioanubis kit's thread did not start")
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the starting thread, or lost with the thread
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from trioanubis.testing.toxiproxy import toxiproxy_balancer

        balancer, proxies = toxiproxy_balancer("", 0, io=io_backend(self.io, None), seed=self.seed,
                                               api=False)  # fmt: skip
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            self._proxies, self._token = proxies, trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            await proxies.close()
            balancer.shutdown(delay=False)

    def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        if self._token is not None and self._stop is not None:
            stop = self._stop
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
        thread.join(START_TIMEOUT)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` in the kit's loop and return its result (or raise its error) here."""
        if self._token is None:
            raise RuntimeError("the kit is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    @property
    def proxies(self) -> Proxies:
        if self._proxies is None:
            raise RuntimeError("the kit is not running")
        return self._proxies

    def proxy(self, upstream: str, *, listen: str = "127.0.0.1:0", name: str = "", seed: int | None = None,
              **faults: Any) -> ProxyHandle:  # fmt: skip
        """A new proxy to `upstream` ("host:port"), with `faults` in force from its first connection."""
        chosen = name or f"proxy{next(self._names)}"
        proxies = self.proxies

        async def create() -> Proxy:
            try:
                return await proxies.create(chosen, listen, upstream, seed=seed)
            except ApiError as exc:
                raise ValueError(f"proxy {chosen!r}: {exc.message}") from None

        handle = ProxyHandle(self, self.call(create))
        if faults:
            handle.set_faults(**faults)
        return handle


@final
class ProxyHandle:
    """One proxy of a `Kit`: where clients connect, and its faults, changed while they are connected."""

    def __init__(self, kit: Kit, proxy: Proxy) -> None:
        self._kit = kit
        self._proxy = proxy
        self.name = proxy.name
        self.upstream = proxy.upstream
        address = parse_listen(proxy.listen)
        self.host: str = address.host
        self.port: int = address.port

    @property
    def address(self) -> str:
        """Where clients connect, "host:port"."""
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ faults

    def set_faults(self, **faults: Any) -> None:
        """Replace every fault of this proxy (see the module docstring for the keys)."""
        table, timed = parse_fault_keywords(faults)
        toxics = fault_toxics(table, timed)
        refuse = FaultConfig(refuse=True, probability=table.probability) if table.refuse else None
        self._kit.call(self._replace, toxics, refuse)

    def clear_faults(self) -> None:
        self._kit.call(self._replace, [], None)

    @contextmanager
    def faults(self, **faults: Any) -> Iterator[ProxyHandle]:
        """These faults while the `with` body runs, none after it."""
        self.set_faults(**faults)
        try:
            yield self
        finally:
            self.clear_faults()

    async def _replace(self, toxics: list[Toxic], refuse: FaultConfig | None) -> None:
        live = self._proxy.toxics
        live.clear()
        for toxic in toxics:
            live.add(toxic)
        balancer = self._kit.proxies.balancer
        if self.name in balancer.pools:
            await controls.set_faults(balancer, self.name, self.upstream, refuse)

    # ------------------------------------------------------------ toxiproxy's toxics

    def add_toxic(self, type: str, *, name: str = "", stream: str = "downstream", toxicity: float = 1.0,
                  **attributes: int) -> dict[str, Any]:  # fmt: skip
        """A toxic as toxiproxy takes it (`add_toxic("latency", latency=100, jitter=10)`): its JSON."""
        body = {"name": name, "type": type, "stream": stream, "toxicity": toxicity, "attributes": attributes}
        return self._kit.call(self._toxics_call, "add", body)

    def update_toxic(self, name: str, *, toxicity: float | None = None, **attributes: int) -> dict[str, Any]:
        body: dict[str, Any] = {"attributes": attributes}
        if toxicity is not None:
            body["toxicity"] = toxicity
        return self._kit.call(self._toxics_call, "update", body, name)

    def remove_toxic(self, name: str) -> None:
        self._kit.call(self._toxics_call, "remove", None, name)

    def toxics(self) -> list[dict[str, Any]]:
        return [toxic.as_json() for toxic in self._proxy.toxics]

    async def _toxics_call(self, action: str, body: Any, name: str = "") -> Any:
        live = self._proxy.toxics
        try:
            if action == "add":
                return live.add(parse_toxic(body)).as_json()
            if action == "update":
                return live.update(name, body).as_json()
            live.remove(name)
            return None
        except ApiError as exc:
            raise ValueError(f"proxy {self.name!r}: {exc.message}") from None

    # ------------------------------------------------------------ down

    def disable(self) -> None:
        """Close the listener (connects are refused) and every open connection: toxiproxy's "down"."""
        self._kit.call(self._enable, False)

    def enable(self) -> None:
        """Listen again, on the same port."""
        self._kit.call(self._enable, True)

    @contextmanager
    def down(self) -> Iterator[ProxyHandle]:
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    async def _enable(self, enabled: bool) -> None:
        proxy = self._proxy
        try:
            await self._kit.proxies.update(proxy.name, proxy.listen, proxy.upstream, enabled)
        except ApiError as exc:
            raise ValueError(f"proxy {self.name!r}: {exc.message}") from None


def parse_listen(listen: str) -> Address:
    host, _, port = listen.rpartition(":")
    return Address(host.strip("[]"), int(port))


def parse_fault_keywords(faults: Mapping[str, Any]) -> tuple[FaultConfig, dict[str, float]]:
    """The `[faults]` keys as a FaultConfig (its parser's checks and messages), the timed ones in seconds."""
    unknown = sorted(set(faults) - set(FAULT_KEYS) - set(TIMED))
    if unknown:
        known = ", ".join((*FAULT_KEYS, *TIMED))
        raise TypeError(f"unknown fault {', '.join(unknown)} (faults: {known})")
    table = parse_faults({k: v for k, v in faults.items() if k in FAULT_KEYS}, "faults")
    timed = {}
    for key in TIMED:
        if key in faults:
            try:
                timed[key] = parse_duration(faults[key], 0.0, DAY)
            except ValueError as exc:
                raise ValueError(f"faults: {key}: {exc}, got {faults[key]!r}") from None
    return table, timed


@contextmanager
def proxy(upstream: str, *, listen: str = "127.0.0.1:0", io: str | None = None, seed: int | None = None,
          **faults: Any) -> Iterator[ProxyHandle]:  # fmt: skip
    """One proxy to `upstream` in a kit of its own, for the `with` body (see the module docstring)."""
    with Kit(io=io, seed=seed) as kit:
        yield kit.proxy(upstream, listen=listen, **faults)
