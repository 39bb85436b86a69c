"""One client connection: pick a server → connect (with failover) → relay.

Theory of operation: `handle_connection` owns the client socket from the
moment the listener accepted it, and the server socket from the moment a
connect succeeded; both are closed in its `finally`, whatever happens. Once
connected the relay (relay.py) runs in this same task: on the epoll backend
the connection is that one task, with no nursery of its own. A server's
`active` count is raised by `Pool.reserve` in the same step as the pick (so
connects in flight count against `max_connections`) and lowered by `release`
when that connect fails or, in a `try/finally` around the relay, when the
connection ends, so a cancelled or failed connection never leaks a count.

Connecting: the pool's strategy picks a server, `connect_any` (proxy/connect.py) tries its
addresses within `connect_timeout` (the socket joins the relay's poller for
the wait and stays there). A failure (refused, reset, timeout) is
reported to the pool (passive ejection) and another server is picked, never
one already tried, up to `retries` more attempts and within
`failover_timeout`. The process-wide `Timer` (timeouts.py) enforces both and
cancels the attempt (`AttemptCancelled`) when the client closes meanwhile (HAProxy's
abortonclose), so a blackholed server never holds a socket for a client that
has left.

`OSError` from connecting is translated once, in proxy/connect.py, into `ConnectFailed`.

A connection knows the listener that accepted it only as an `Origin` (its
name, pool, readiness backend and Timer, and where to report its end), and
what a listener with routes or tls did first as an `Opening`, so this module
imports neither listener.py nor tls_listener.py.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

import trio

from trioanubis.errors import AttemptCancelled, ConnectFailed, OutOfResources
from trioanubis.pool import Pool, Server
from trioanubis.proxy.connect import Connecting, connect_any, connect_timed_out
from trioanubis.proxy.faulted import relay_faulted
from trioanubis.proxy.faults import draw, refused
from trioanubis.proxy.header_io import send_proxy_header, send_to_server
from trioanubis.proxy.hold import hold
from trioanubis.proxy.record import CLOSED_CLEANLY, ConnectionRecord
from trioanubis.proxy.relay import Relay, reset_on_close
from trioanubis.proxy.tls_relay import ServerTls, relay_streams, release_sockets, socket_stream

if TYPE_CHECKING:
    from trioanubis.proxy.io import Readiness
    from trioanubis.proxy.timeouts import Timer
    from trioanubis.tls.stream import TlsStream

log = logging.getLogger("trioanubis.connection")

# A constant task name for every connection's task: Trio would otherwise format one string per task.
CONNECTION_TASK_NAME: Final = "trioanubis.connection"


class Origin(Protocol):
    """What a connection needs from the listener that accepted it (listener.py's `Listener` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def pool(self) -> Pool | None: ...
    @property
    def poller(self) -> Readiness: ...
    @property
    def timer(self) -> Timer: ...
    def connection_ended(self, record: ConnectionRecord, pool: Pool) -> None: ...


@final
@dataclass(slots=True)
class Opening:
    """What a listener with routes or tls did first: the pool, bytes to send first, the client's TLS."""

    pool: Pool
    prefix: bytes = b""
    client_tls: TlsStream | None = None


async def _attempt(connecting: Connecting, server: Server, timeout: float, deadline: float) -> socket.socket:
    """One connect attempt of a client's connection, timed by the Timer, not a deadline of its own."""
    connecting.deadline = min(connecting.poller.now() + timeout, deadline)
    if server.faults is not None and (refusal := refused(server)) is not None:
        raise refusal  # an injected `refuse`: failover and ejection see a refused connect
    try:
        return await connect_any(server, connecting)
    except AttemptCancelled:
        if connecting.end == "timeout":
            raise connect_timed_out(server, timeout) from None
        raise ConnectFailed(f"connecting to {server.address}: the client left", "client_abort") from None


async def connect_with_failover(
    pool: Pool, relay: Relay, client_key: bytes, record: ConnectionRecord, tls: ServerTls | None = None
) -> bool:
    """Pick and connect, failing over to other servers; sets relay.server or returns False.

    Each attempt has `connect_timeout`, all of them together `failover_timeout`;
    the Timer enforces both and cancels the attempt if the client leaves. A
    pool with `queue_timeout` holds a client no server could take (hold.py),
    and one that arrives while others are held joins the end of their line. With
    `tls` (the pool originates TLS), the handshake is part of the attempt: a
    failed one (a certificate that does not verify) fails over like a refusal.
    """
    relay.connecting = Connecting(relay.poller)  # the Timer watches it until we return
    try:
        if not pool.config.queue_timeout:
            return await _try_servers(pool, relay, client_key, record, tls) or _no_server(pool, record)
        if not len(pool.held) and await _try_servers(pool, relay, client_key, record, tls):
            return True
        if record.end == "client_abort":
            return False
        if await hold(pool, relay, record, lambda: _try_servers(pool, relay, client_key, record, tls)):
            return True
        if record.end in ("queue_full", "queue_timeout"):
            return False  # counted by the queue
        return _no_server(pool, record)
    finally:
        relay.connecting = None
        relay.active = True  # idle from the Timer's next look on (a float of its own would cost 24 bytes)


async def _try_servers(
    pool: Pool, relay: Relay, client_key: bytes, record: ConnectionRecord, tls: ServerTls | None
) -> bool:
    """One round of pick → connect with failover; False with `record.end` set when it found none."""
    config = pool.config
    connecting = relay.connecting
    assert connecting is not None
    tried: list[Server] = []
    now = connecting.started = relay.poller.now()
    deadline = now + config.failover_timeout if config.failover_timeout else float("inf")
    try:
        for _ in range(config.retries + 1):
            server = pool.pick(client_key, tried)
            if server is None:
                break
            pool.reserve(server)  # in the same step as the pick: counts against max_connections now
            tried.append(server)
            started = relay.poller.now()
            try:
                relay.server = await _attempt(connecting, server, config.connect_timeout, deadline)
                if tls is not None:
                    await tls.originate(relay, server)
            except BaseException as exc:
                if relay.server is not None:  # connected, but the TLS handshake failed
                    release_sockets(relay.server)
                    relay.poller.close(relay.server)
                    relay.server = None
                pool.release(server)
                if not isinstance(exc, ConnectFailed):
                    raise
                if connecting.end == "client_abort":
                    record.end = "client_abort"
                    return False
                log.info("%s (pool %s, client %s)", exc, pool.name, record.client)
                if isinstance(exc, OutOfResources):
                    break  # our shortage, not the server's fault: no ejection, no failover
                pool.record_connect_failure(server, exc.reason)
                if relay.poller.now() >= deadline:
                    log.info("pool %s: failover_timeout reached after %d attempts", pool.name, len(tried))
                    break
                connecting.end = ""
                continue
            relay.server_record = server
            pool.record_connect_success(server, relay.poller.now() - started)
            return True
    finally:
        connecting.deadline = float("inf")  # between rounds (held): nothing for the Timer to time out
    record.end = "connect_failed" if tried else "no_server"
    return False


def _no_server(pool: Pool, record: ConnectionRecord) -> bool:
    """Account for a client closed because no server took it; always False."""
    if record.end == "client_abort":
        return False
    pool.no_server += 1
    if record.end == "connect_failed":
        return False
    if pool.candidates():
        pool.all_full += 1
        log.warning("pool %s: every server is at max_connections; closing client %s",
                    pool.name, record.client)  # fmt: skip
    else:
        log.warning("pool %s: no server available; closing client %s", pool.name, record.client)
    return False


async def handle_connection(
    client: socket.socket,
    addr: tuple[object, ...],
    listener: Origin,
    local: tuple[str, int] | None = None,
    opening: Opening | None = None,
) -> None:
    """Serve one accepted client until it ends; closes both sockets in every case.

    This is the connection's task (its root coroutine, so a parked connection
    carries no extra frame); the listener accounts for it at the end. `addr` is
    the client (from accept, or the PROXY header admission.py read); `local`,
    where it connected to when a PROXY header said so (for `send_proxy`);
    `opening`, what a listener with routes or tls did first (tls_listener.py):
    the pool, bytes to send first, the client's TLS stream. A connection with
    TLS on either side is relayed by tls_relay.py, any other by relay.py.

    An idle connection keeps this frame (twice: Trio takes the root
    coroutine's frame object), 16 bytes per local variable: what only some
    connections do (a PROXY header, TLS, a prefix, injected faults) is in
    `_relay_with_extras`, and the rest is read from the relay and the listener.
    """
    record = ConnectionRecord(listener.name, addr, started=listener.poller.now())
    # A reload may point the listener elsewhere meanwhile; a listener without opening has a pool.
    pool = opening.pool if opening is not None else listener.pool
    assert pool is not None
    server_tls = ServerTls(pool.config.tls) if pool.config.tls is not None else None
    relay = Relay(
        client, idle_timeout=pool.config.idle_timeout, half_close_timeout=pool.config.half_close_timeout,
        poller=listener.poller, pool=pool,
    )  # fmt: skip
    listener.timer.watch(relay)
    try:
        if not await connect_with_failover(pool, relay, _client_key(addr), record, server_tls):
            return
        server = relay.server_record
        assert server is not None
        try:  # the connect's reservation of `server` is ours now: released whatever happens
            record.server = server.name
            if (server_tls is None and opening is None and server.faults is None
                    and (server.send_proxy or pool.config.send_proxy) == "none"):  # fmt: skip
                pool.acquire(server)
                await relay.run()  # both directions, in this task on the epoll backend
            else:
                await _relay_with_extras(relay, addr, local, opening, server_tls)
        finally:
            record.bytes_in, record.bytes_out = relay.bytes_in, relay.bytes_out
            record.end = relay.end or "shutdown"
            pool.release(server, relay.bytes_in, relay.bytes_out)
    except Exception:
        # A bug or an unforeseen error ends this connection only, never the process.
        record.end = "internal_error"
        log.exception("listener %s: connection from %s failed unexpectedly", listener.name, record.client)
    finally:
        listener.timer.unwatch(relay)
        if server_tls is not None or opening is not None:  # Trio's own waits may have seen these sockets
            release_sockets(client, relay.server)
        if record.end not in CLOSED_CLEANLY:
            reset_on_close(client)
            if relay.server is not None:
                reset_on_close(relay.server)
        if relay.server is not None:
            relay.poller.close(relay.server)
        relay.poller.close(client)
        listener.connection_ended(record, pool)


async def _relay_with_extras(
    relay: Relay,
    addr: tuple[object, ...],
    local: tuple[str, int] | None,
    opening: Opening | None,
    server_tls: ServerTls | None,
) -> None:
    """Relay a connection that needs more than relay.py: a PROXY header, TLS, a prefix, injected faults."""
    pool, server = relay.pool, relay.server_record
    assert pool is not None and server is not None
    version = server.send_proxy or pool.config.send_proxy
    if version != "none" and not await send_proxy_header(relay, version, addr, local):
        relay.end = "server_reset"
        return
    pool.acquire(server)
    if server_tls is not None or (opening is not None and opening.client_tls is not None):
        await _relay_tls(relay, opening, server_tls)
        return
    if opening is not None and opening.prefix and not await send_to_server(relay, opening.prefix):
        relay.end = "server_reset"
        return
    plan = None if server.faults is None else draw(server.faults, server)
    if plan is None:
        await relay.run()
    else:  # injected faults: the copying path of proxy/faulted.py, tasks in a nursery
        async with trio.open_nursery() as nursery:
            relay_faulted(relay, plan, nursery)


async def _relay_tls(relay: Relay, opening: Opening | None, server_tls: ServerTls | None) -> None:
    """The relay when either side speaks TLS (tls_relay.py); the bytes read while routing go first."""
    assert relay.server is not None
    client = opening.client_tls if opening is not None and opening.client_tls is not None else None
    server = server_tls.stream if server_tls is not None and server_tls.stream is not None else None
    if server is None:
        relay.poller.unregister(relay.server.fileno())  # Trio waits on it from now on
    server_stream = server or socket_stream(relay.server)
    if opening is not None and opening.prefix:
        relay.bytes_in += len(opening.prefix)
        try:
            await server_stream.send_all(opening.prefix)
        except (trio.BrokenResourceError, OSError):
            relay.end = "server_reset"
            return
    await relay_streams(relay, client or socket_stream(relay.client), server_stream)


def _client_key(addr: tuple[object, ...]) -> bytes:
    """What source_hash hashes: the client's address as packed bytes."""
    host = str(addr[0])
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.inet_pton(family, host)
    except OSError:
        return host.encode()
