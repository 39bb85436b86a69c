"""Before connecting, on a listener with `routes` or `tls`: read the ClientHello, pick the pool, handshake.

Theory of operation: a listener with `routes` (SNI routing) or `tls`
(termination) starts each connection with `serve_tls_client`. Within
`peek_timeout` from the accept it

1. with `routes`: reads the client's first bytes into a `HelloReader`
   (tls_hello.py) until the ClientHello is whole (at most 16 KiB + 5 bytes
   are held), and picks the pool by its server name and ALPN
   (sni_routes.py). No name, no matching route, a first byte that is not
   TLS or a malformed hello go to the listener's `pool` (nginx's
   `ssl_preread` does the same); without one the client is closed. The bytes
   read are not lost: they are sent to the server first, unchanged, so the
   TLS session stays end to end (`Opening.prefix`);
2. with `tls`: completes the TLS handshake with the listener's certificates
   (the bytes read in 1. are fed to it first).

A client that sends nothing, or not enough, within `peek_timeout` is
closed. The connection then continues as any other in a new task
(`handle_connection`, connection.py) with the `Opening`: the pool, the bytes
to send first, the client's TLS stream. What happened is counted per
listener (`Listener.tls_counts`, shown in /stats).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Final, Protocol

import trio

from trioanubis.proxy.connect import close_socket
from trioanubis.proxy.connection import CONNECTION_TASK_NAME, Opening, Origin, handle_connection
from trioanubis.proxy.tls_relay import socket_stream
from trioanubis.tls.hello import Hello, HelloReader
from trioanubis.tls.stream import TlsError, TlsStream

if TYPE_CHECKING:
    from collections.abc import Mapping

    from trioanubis.config import ListenerConfig
    from trioanubis.pool import Pool
    from trioanubis.proxy.sni_routes import RouteTable

log = logging.getLogger("trioanubis.tls")

# What tls_counts counts: routed by a route, sent to the fallback pool (and why), closed (and why).
COUNTS: Final = ("routed", "fallback", "not_tls", "bad_hello", "no_route", "peek_timeout", "handshake_failed")


class TlsOrigin(Origin, Protocol):
    """What the opening needs from its listener, beyond what a connection needs."""

    @property
    def config(self) -> ListenerConfig: ...
    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def routes(self) -> RouteTable: ...
    @property
    def connections(self) -> trio.Nursery | None: ...
    @property
    def tls_counts(self) -> dict[str, int]: ...
    def closed_before_relay(self) -> None: ...


async def serve_tls_client(
    client: socket.socket, addr: tuple[object, ...], listener: TlsOrigin, local: tuple[str, int] | None = None
) -> None:
    """The first task of a connection to a listener with routes or tls (see the module docstring)."""
    opening: Opening | None = None
    try:
        with trio.move_on_after(listener.config.peek_timeout) as scope:
            opening = await _open(client, addr, listener)
        if scope.cancelled_caught:
            listener.tls_counts["peek_timeout"] += 1
    except Exception:  # a bug ends this connection only, never the process
        log.exception("listener %s: the TLS opening of %s failed unexpectedly", listener.name, addr[0])
    finally:
        if opening is None:
            close_socket(client)
            listener.closed_before_relay()
    if opening is not None:
        assert listener.connections is not None
        listener.connections.start_soon(handle_connection, client, addr, listener, local, opening,
                                        name=CONNECTION_TASK_NAME)  # fmt: skip


async def _open(client: socket.socket, addr: tuple[object, ...], listener: TlsOrigin) -> Opening | None:
    pool, prefix = listener.pool, b""
    if listener.routes:
        routed = await _route(client, listener)
        if routed is None:
            return None
        pool, prefix = routed
    if pool is None:
        listener.tls_counts["no_route"] += 1
        return None
    tls = listener.config.tls
    if tls is None:
        return Opening(pool, prefix)
    stream = TlsStream(socket_stream(client), tls.context, server_side=True, received=prefix)
    try:
        await stream.do_handshake()
    except TlsError as exc:
        listener.tls_counts["handshake_failed"] += 1
        log.debug("listener %s: TLS handshake with %s failed: %s", listener.name, addr[0], exc.reason)
        return None
    return Opening(pool, b"", stream)


async def _route(client: socket.socket, listener: TlsOrigin) -> tuple[Pool | None, bytes] | None:
    """The pool the ClientHello asks for (None: the fallback) and the bytes read; None if the client left."""
    reader = HelloReader()
    hello = await _read_hello(client, reader)
    if hello is None:
        return None
    counts = listener.tls_counts
    if hello.status == "hello":
        name = listener.routes.pick(hello.server_name, hello.alpn)
        pool = listener.pools.get(name) if name else None
        if pool is not None:
            counts["routed"] += 1
            return pool, bytes(reader.data)
        counts["fallback"] += 1
    elif hello.status == "not_tls":
        counts["not_tls"] += 1
    else:
        counts["bad_hello"] += 1
        log.debug("listener %s: unreadable ClientHello: %s", listener.name, hello.error)
    return listener.pool, bytes(reader.data)


async def _read_hello(client: socket.socket, reader: HelloReader) -> Hello | None:
    """Read until the reader has a result; None when the client closed or failed first."""
    while True:
        try:
            data = client.recv(max(reader.room(), 1))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(client)
            continue
        except OSError:
            return None
        if not data:
            return None
        hello = reader.feed(data)
        if hello.status != "need_more":
            return hello
