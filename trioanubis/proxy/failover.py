"""Connecting a client: pick a server, connect with failover, hold the client while none can take it.

Theory of operation: `connect` is the connection's second stage
(connection.py). The pool's strategy picks a server, and the connection
takes one of its slots in the same step (`Connection.reserve`: connects in
flight count against `max_connections`). An attempt is everything before the
first byte of the client's reaches the server: the TCP connect
(proxy/connect.py's `connect_any`, through the connection's readiness
backend), then what a server must get first, in the order the protocols
nest: our PROXY header (`send_proxy`, in clear text even before TLS), the
TLS handshake when the pool originates TLS (its certificate verified), and
the bytes the listener read while routing (the client's ClientHello). Any of
these failing is a failed attempt: the slot is given back, the failure is
reported to the pool (passive ejection) and another server is picked, never
one already tried, up to `retries` more attempts within `failover_timeout`.

Each attempt has `connect_timeout`, capped by `failover_timeout`; the
process-wide `Timer` (timeouts.py) enforces both on the connection's
`Connecting` state and cancels the attempt (`AttemptCancelled`) when the
client leaves meanwhile (HAProxy's abortonclose), so a blackholed server
never holds a socket for a client that has gone. A TLS handshake waits with
Trio's own waits, under a deadline of its own at the same moment.

When no attempt succeeded, a pool with `queue_timeout` holds the client
(hold.py) instead of closing it, and a client that arrives while others are
held joins their line (in accept order) rather than overtaking them.
Otherwise the connection ends `connect_failed` (servers were tried) or
`no_server` (none could be picked), counted per pool.

`OSError` from connecting is translated once, in proxy/connect.py, into `ConnectFailed`.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.errors import AttemptCancelled, ConnectFailed, OutOfResources
from trioanubis.proxy.connect import Connecting, connect_any, connect_timed_out, send_first
from trioanubis.proxy.faults import refused
from trioanubis.proxy.hold import hold
from trioanubis.proxy.lifecycle import normalise_peer
from trioanubis.proxy.proxy_protocol import build_header
from trioanubis.proxy.streams import socket_stream
from trioanubis.tls.stream import TlsError, TlsStream

if TYPE_CHECKING:
    from trioanubis.config import TlsClient
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.lifecycle import Connection, EndState

log = logging.getLogger("trioanubis.connection")


async def connect(conn: Connection) -> bool:
    """Connect `conn` to a server of its pool (holding it if the pool does); False when it ended instead."""
    pool = conn.pool
    assert pool is not None
    conn.connecting = Connecting(conn.origin.poller)  # the Timer watches it until we return
    conn.watch()
    try:
        if pool.config.queue_timeout and len(pool.held):
            outcome: EndState | str = "no_server"  # others are held: join their line, don't overtake
        else:
            outcome = await try_servers(conn)
        if outcome and outcome != "client_abort" and pool.config.queue_timeout:
            outcome = await hold(conn, try_servers)
        elif outcome in ("connect_failed", "no_server"):
            _no_server(pool, conn, outcome)
    finally:
        conn.connecting = None
    if not outcome:
        return True
    conn.end_with(outcome)  # type: ignore[arg-type]  # hold and try_servers return end states
    return False


async def try_servers(conn: Connection) -> EndState | str:
    """One round of pick → connect with failover: "" once connected, else why not."""
    pool, connecting = conn.pool, conn.connecting
    assert pool is not None and connecting is not None
    config = pool.config
    poller = connecting.poller
    key = client_key(conn.peer)
    tried: list[Server] = []
    timeout = config.connect_timeout
    now = connecting.started = poller.now()
    deadline = now + config.failover_timeout if config.failover_timeout else math.inf
    try:
        for _ in range(config.retries + 1):
            server = pool.pick(key, tried)
            if server is None:
                break
            conn.reserve(server)  # in the same step as the pick: counts against max_connections now
            if tried:  # a failover: the attempt's own start (the first starts with the round)
                now = poller.now()
            tried.append(server)
            try:
                await _attempt(conn, server, timeout, min(now + timeout, deadline))
            except ConnectFailed as exc:
                conn.unreserve()
                if connecting.end == "client_abort":
                    return "client_abort"
                log.info("%s (pool %s, client %s)", exc, pool.name, conn.client)
                if isinstance(exc, OutOfResources):
                    break  # our shortage, not the server's fault: no ejection, no failover
                pool.record_connect_failure(server, exc.reason)
                if poller.now() >= deadline:
                    log.info("pool %s: failover_timeout reached after %d attempts", pool.name, len(tried))
                    break
                connecting.end = ""
                continue
            pool.acquire(server)
            pool.record_connect_success(server, now, poller.now)
            return ""
    finally:
        connecting.deadline = math.inf  # between rounds (held): nothing for the Timer to time out
    return "connect_failed" if tried else "no_server"


async def _attempt(conn: Connection, server: Server, timeout: float, deadline: float) -> None:
    """Connect to `server` and send it what comes first, by `deadline` (`timeout` after the attempt
    began, or the failover's, if sooner); `conn.server_sock` is set on success only."""
    connecting = conn.connecting
    assert connecting is not None
    connecting.deadline = deadline
    if server.faults is not None and (refusal := refused(server)) is not None:
        raise refusal  # an injected `refuse`: failover and ejection see a refused connect
    try:
        conn.server_sock = await connect_any(server, connecting, delay_ack=_sends_at_once(conn, server))
        await _greet(conn, server, connecting)
    except AttemptCancelled:
        _drop_server_socket(conn)
        if connecting.end == "timeout":
            raise connect_timed_out(server, timeout) from None
        raise ConnectFailed(f"connecting to {server.address}: the client left", "client_abort") from None
    except BaseException:
        _drop_server_socket(conn)
        raise


def _sends_at_once(conn: Connection, server: Server) -> bool:
    """True when bytes go to `server` as soon as it is connected: its handshake's last ACK may wait
    for them (connect.py's `delay_ack`). The client's own, read early, or ours before them."""
    if conn.early:
        return True
    pool = conn.pool
    assert pool is not None
    config = pool.config
    return (server.send_proxy or config.send_proxy) != "none" or config.tls is not None or (
        conn.extras is not None and bool(conn.extras.prefix))


async def _greet(conn: Connection, server: Server, connecting: Connecting) -> None:
    """What the server gets before the client's first byte: our PROXY header, TLS, the routing bytes."""
    pool = conn.pool
    sock = conn.server_sock
    assert pool is not None and sock is not None
    extras = conn.extras
    version = server.send_proxy or pool.config.send_proxy
    if version != "none":
        local = extras.local if extras is not None else None
        header = build_header(version, _host_port(conn.peer), local or _local(conn))
        await send_first(sock, header, connecting)
    tls = pool.config.tls
    if tls is not None:
        await _originate(conn, server, tls, connecting.deadline)
    if extras is not None and extras.prefix:
        if extras.server_tls is not None:
            await _send_tls(extras.server_tls, extras.prefix, server)
        else:
            await send_first(sock, extras.prefix, connecting)
        conn.bytes_in += len(extras.prefix)


async def _originate(conn: Connection, server: Server, tls: TlsClient, deadline: float) -> None:
    """The TLS handshake with `server`, within the attempt's deadline; ConnectFailed with the reason."""
    sock = conn.server_sock
    assert sock is not None
    conn.origin.poller.unregister(sock.fileno())  # Trio's own waits from now on
    conn.waited_by_trio()
    stream = TlsStream(socket_stream(conn.trio_server()), tls.context, server_side=False,
                       server_hostname=tls.sni or server.address.host)  # fmt: skip
    with trio.move_on_at(deadline) as scope:
        try:
            await stream.do_handshake()
        except TlsError as exc:
            raise ConnectFailed(f"connecting to {server.address}: {exc}", exc.reason) from None
    if scope.cancelled_caught:
        raise ConnectFailed(f"connecting to {server.address}: TLS handshake timeout", "timeout")
    conn.more.server_tls = stream


async def _send_tls(stream: trio.abc.Stream, data: bytes, server: Server) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        raise ConnectFailed(f"connecting to {server.address}: reset while sending", "reset") from None


def _drop_server_socket(conn: Connection) -> None:
    """Close the socket of a failed attempt (the next attempt makes its own)."""
    sock = conn.server_sock
    if sock is None:
        return
    conn.server_sock = None
    if conn.extras is not None:
        conn.extras.server_tls = None
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)  # a TLS handshake waited on it through Trio
    conn.origin.poller.close(sock)


def _no_server(pool: Pool, conn: Connection, outcome: str) -> None:
    """Account for a client closed because no server took it."""
    pool.no_server += 1
    if outcome == "connect_failed":
        return
    if pool.candidates():
        pool.all_full += 1
        log.warning("pool %s: every server is at max_connections; closing client %s",
                    pool.name, conn.client)  # fmt: skip
    else:
        log.warning("pool %s: no server available; closing client %s", pool.name, conn.client)


def _host_port(addr: tuple[object, ...]) -> tuple[str, int]:
    return str(addr[0]), int(addr[1])  # type: ignore[call-overload]


def _local(conn: Connection) -> tuple[str, int] | None:
    """Where the client connected to (for our PROXY header), as IPv4 when it was IPv4-mapped."""
    try:
        local = conn.client_sock.getsockname()
    except OSError:
        return None
    return _host_port(normalise_peer(local))


# Read once: in the compiled build a module-level Final is a native load, `socket.X` a lookup by name.
_AF_INET: Final[int] = socket.AF_INET
_AF_INET6: Final[int] = socket.AF_INET6
_inet_pton: Final = socket.inet_pton


def client_key(addr: tuple[object, ...]) -> bytes:
    """What source_hash hashes: the client's address as packed bytes."""
    host = str(addr[0])
    try:
        return _inet_pton(_AF_INET6 if ":" in host else _AF_INET, host)
    except OSError:
        return host.encode()
