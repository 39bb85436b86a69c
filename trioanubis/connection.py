"""One client connection: pick a server → connect (with failover) → relay.

Theory of operation: `handle_connection` owns the client socket from the
moment the listener accepted it, and the server socket from the moment a
connect succeeded; both are closed in its `finally`, whatever happens. Once
connected it opens the connection's nursery, where the relay runs its two
pumps (relay.py). A server's `active` count is raised by `Pool.reserve` in the
same step as the pick (so connects in flight count against `max_connections`)
and lowered by `release` when that connect fails or, in a `try/finally` around
the relay, when the connection ends, so a cancelled or failed connection never
leaks a count.

Connecting: the pool's strategy picks a server, `_connect_any` tries its
addresses within `connect_timeout` (the socket joins the relay's poller for
the wait and stays there). A failure (refused, reset, timeout) is
reported to the pool (passive ejection) and another server is picked, never
one already tried, up to `retries` more attempts and within
`failover_timeout`. The process-wide `Timer` (timeouts.py) enforces both and
cancels the attempt (`AttemptCancelled`) when the client closes meanwhile (HAProxy's
abortonclose), so a blackholed server never holds a socket for a client that
has left.

`OSError` from connecting is translated here, once, into `ConnectFailed`.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.errors import AttemptCancelled, ConnectFailed, OutOfResources
from trioanubis.pool import Pool, Server
from trioanubis.proxy_io import send_proxy_header, send_to_server
from trioanubis.relay import Relay, reset_on_close
from trioanubis.tls_relay import ServerTls, relay_streams, release_sockets, socket_stream

if TYPE_CHECKING:
    from trioanubis.listener import Listener
    from trioanubis.poller import Poller
    from trioanubis.tls_listener import Opening

log = logging.getLogger("trioanubis.connection")


@final
@dataclass(slots=True)
class ConnectionRecord:
    """What the access log and the counters learn about one finished connection."""

    listener: str
    peer: tuple[object, ...]  # the client's address, as accept() gave it
    server: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = 0.0
    ended: float = 0.0  # stamped once, when the listener accounts for it
    end: str = ""

    @property
    def client(self) -> str:
        """The client as host:port, formatted when needed (most connections are never logged)."""
        host = str(self.peer[0])
        return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"


# Ends after which both sockets close with FIN: both sides finished, or nothing was
# relayed. Every other end (a peer's reset, idle or half-close timeout, a stop, a
# bug) resets both sides, so no peer takes a cut for a complete transfer.
CLOSED_CLEANLY: Final = frozenset({"client_eof", "server_eof", "connect_failed", "no_server",
                                   "client_abort"})  # fmt: skip


def close_socket(sock: socket.socket) -> None:
    """Close a socket, first waking any task that waits on it (Trio requires this)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
    sock.close()


# Errors that mean this process ran short (descriptors, buffers), whoever it talks to.
LOCAL_SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # Linux, like the epoll poller


def _new_socket(family: int, address: object) -> socket.socket:
    """A non-blocking TCP socket; running out of descriptors is a ConnectFailed, not a crash."""
    try:
        # Created non-blocking: one system call instead of socket() + ioctl(FIONBIO).
        sock = socket.socket(family, _NONBLOCKING_STREAM)
    except OSError as exc:
        reason = _reason(exc.errno or 0)
        message = f"connecting to {address}: cannot create a socket: {reason}"
        if exc.errno in LOCAL_SHORTAGE_ERRNOS:
            raise OutOfResources(message, reason) from exc
        raise ConnectFailed(message, reason) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reason(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if code in (errno.ETIMEDOUT,):
        return "timeout"
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    if code in LOCAL_SHORTAGE_ERRNOS:
        return "out of resources"
    return errno.errorcode.get(code, str(code)).lower()


async def _connect_any(server: Server, relay: Relay | None = None) -> socket.socket:
    """Connect to the first of `server`'s addresses that accepts; ConnectFailed otherwise.

    A client's connection passes its `relay`: the socket joins the relay's
    poller before the wait and stays in it for the relay, so Trio's epoll never
    sees it, and `relay.attempt_fd` names it while the Timer may cancel the
    wait. Health checks pass none and wait through Trio.

    Not bounded in time: the caller is (a deadline, or the Timer).
    """
    poller = relay.poller if relay is not None else None
    last: ConnectFailed | None = None
    for family, sockaddr in server.sockaddrs:
        sock = _new_socket(family, server.address)
        try:
            code = sock.connect_ex(sockaddr)
            if poller is not None and code in (0, errno.EINPROGRESS):
                poller.register(sock.fileno())
            if code == errno.EINPROGRESS:
                if relay is not None:
                    relay.attempt_fd = sock.fileno()
                    await relay.poller.wait_writable(relay.attempt_fd)
                else:
                    await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                return sock
        except BaseException:
            _close(sock, poller)
            raise
        _close(sock, poller)
        reason = _reason(code)
        last = ConnectFailed(f"connecting to {server.address}: {reason}", reason)
    raise last or ConnectFailed(f"connecting to {server.address}: no address resolved", "unresolved")


def _close(sock: socket.socket, poller: Poller | None) -> None:
    if poller is not None:
        poller.close(sock)
    else:
        close_socket(sock)


def _timed_out(server: Server, timeout: float) -> ConnectFailed:
    return ConnectFailed(f"connecting to {server.address}: timeout after {timeout:g}s", "timeout")


async def open_server_socket(server: Server, timeout: float) -> socket.socket:
    """Connect to one of `server`'s addresses within `timeout` (health checks use this)."""
    with trio.move_on_after(timeout):
        return await _connect_any(server)
    raise _timed_out(server, timeout)


async def _attempt(relay: Relay, server: Server, timeout: float, deadline: float) -> socket.socket:
    """One connect attempt of a client's connection, timed by the Timer, not a deadline of its own."""
    relay.attempt_deadline = min(relay.poller.now() + timeout, deadline)
    try:
        return await _connect_any(server, relay)
    except AttemptCancelled:
        if relay.attempt_end == "timeout":
            raise _timed_out(server, timeout) from None
        raise ConnectFailed(f"connecting to {server.address}: the client left", "client_abort") from None
    finally:
        relay.attempt_fd = -1


async def connect_with_failover(
    pool: Pool, relay: Relay, client_key: bytes, record: ConnectionRecord, tls: ServerTls | None = None
) -> bool:
    """Pick and connect, failing over to other servers; sets relay.server or returns False.

    Each attempt has `connect_timeout`, all of them together `failover_timeout`;
    the Timer enforces both and cancels the attempt if the client leaves. With
    `tls` (the pool originates TLS), the handshake is part of the attempt: a
    failed one (a certificate that does not verify) fails over like a refusal.
    """
    config = pool.config
    tried: list[Server] = []
    now = relay.poller.now()
    relay.connecting = True
    relay.connect_started = now
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
                relay.server = await _attempt(relay, server, config.connect_timeout, deadline)
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
                if relay.attempt_end == "client_abort":
                    record.end = "client_abort"
                    return False
                log.info("%s (pool %s, client %s)", exc, pool.name, record.client)
                if isinstance(exc, OutOfResources):
                    break  # our shortage, not the server's fault: no ejection, no failover
                pool.record_connect_failure(server, exc.reason)
                if relay.poller.now() >= deadline:
                    log.info("pool %s: failover_timeout reached after %d attempts", pool.name, len(tried))
                    break
                relay.attempt_end = ""
                continue
            relay.server_record = server
            pool.record_connect_success(server, relay.poller.now() - started)
            return True
    finally:
        relay.connecting = False
    pool.no_server += 1
    if tried:
        record.end = "connect_failed"
        return False
    record.end = "no_server"
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
    listener: Listener,
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
    """
    record = ConnectionRecord(listener.name, addr, started=listener.poller.now())
    # A reload may point the listener elsewhere meanwhile; a listener without opening has a pool.
    pool = opening.pool if opening is not None else listener.pool
    assert pool is not None
    config = pool.config
    server_tls = ServerTls(config.tls) if config.tls is not None else None
    streams = server_tls is not None or (opening is not None and opening.client_tls is not None)
    poller, timer = listener.poller, listener.timer
    relay = Relay(client, idle_timeout=config.idle_timeout, half_close_timeout=config.half_close_timeout,
                  poller=poller, pool=pool)  # fmt: skip
    timer.watch(relay)
    try:
        if not await connect_with_failover(pool, relay, _client_key(addr), record, server_tls):
            return
        server = relay.server_record
        assert server is not None
        try:  # the connect's reservation of `server` is ours now: released whatever happens
            record.server = server.name
            version = server.send_proxy or config.send_proxy
            if version != "none" and not await send_proxy_header(relay, version, addr, local):
                relay.end = "server_reset"
                return
            pool.acquire(server)
            if streams:
                await _relay_tls(relay, opening, server_tls)
            else:
                if opening is not None and opening.prefix and not await send_to_server(relay, opening.prefix):
                    relay.end = "server_reset"
                    return
                async with trio.open_nursery() as nursery:  # this connection's: one task per direction
                    relay.start(nursery)
                    await relay.upstream()
        finally:
            record.bytes_in, record.bytes_out = relay.bytes_in, relay.bytes_out
            record.end = relay.end or "shutdown"
            pool.release(server, relay.bytes_in, relay.bytes_out)
    except Exception:
        # A bug or an unforeseen error ends this connection only, never the process.
        record.end = "internal_error"
        log.exception("listener %s: connection from %s failed unexpectedly", listener.name, record.client)
    finally:
        timer.unwatch(relay)
        if streams or opening is not None:  # Trio's own waits saw these sockets
            release_sockets(client, relay.server)
        if record.end not in CLOSED_CLEANLY:
            reset_on_close(client)
            if relay.server is not None:
                reset_on_close(relay.server)
        if relay.server is not None:
            poller.close(relay.server)
        poller.close(client)
        listener.connection_ended(record, pool)


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
