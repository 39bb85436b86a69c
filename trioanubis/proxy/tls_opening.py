"""The opening stage of a listener with `routes` or `tls`: read the ClientHello, pick the pool, handshake.

Theory of operation: `open_tls` is a stage of the connection's task
(connection.py), after the PROXY header if the listener takes one. Within
`peek_timeout` from its start it

1. with `routes`: reads the client's first bytes into a `HelloReader`
   (tls/hello.py) until the ClientHello is whole (at most 16 KiB + 5 bytes
   are held), and picks the pool by its server name and ALPN
   (sni_routes.py). No name, no matching route, a first byte that is not
   TLS or a malformed hello go to the listener's `pool` (nginx's
   `ssl_preread` does the same); without one the connection ends
   `no_route`. The bytes read are not lost: they are sent to the server
   first, unchanged, so the TLS session stays end to end
   (`Extras.prefix`, sent by failover.py as part of each connect attempt);
2. with `tls`: completes the TLS handshake with the listener's certificates
   (the bytes read in 1. are fed to it first); the connection then relays
   through that TLS stream (`Extras.client_tls`, streams.py).

A client that sends nothing, or not enough, within `peek_timeout` ends
`peek_timeout`; one that closes first, `client_abort`; a failed handshake,
`handshake_failed`. Whatever happens, the connection gives back what it
holds (lifecycle.py), its per-client slot included. What happened is
counted per listener (`Listener.tls_counts`, shown in /stats).
"""

from __future__ import annotations

import _socket
import logging
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.proxy.streams import socket_stream
from trioanubis.tls.hello import Hello, HelloReader
from trioanubis.tls.stream import TlsError, TlsStream

if TYPE_CHECKING:

    from trioanubis.pool import Pool
    from trioanubis.proxy.lifecycle import Connection

log = logging.getLogger("trioanubis.tls")

# What tls_counts counts: routed by a route, sent to the fallback pool (and why), closed (and why).
COUNTS: Final = ("routed", "fallback", "not_tls", "bad_hello", "no_route", "peek_timeout", "handshake_failed")


async def open_tls(conn: Connection) -> bool:
    """The opening stage of a listener with routes or tls (see the module docstring); False when it ended."""
    origin = conn.origin
    conn.waited_by_trio()  # the hello and the handshake are read with Trio's own waits
    with trio.move_on_after(origin.config.peek_timeout):
        return await _open(conn)
    origin.tls_counts["peek_timeout"] += 1
    conn.end_with("peek_timeout")
    return False


async def _open(conn: Connection) -> bool:
    origin = conn.origin
    if origin.routes:
        routed = await _route(conn)
        if routed is None:
            conn.end_with("client_abort")
            return False
        conn.pool, prefix = routed
        if prefix:
            conn.more.prefix = prefix
    if conn.pool is None:
        origin.tls_counts["no_route"] += 1
        conn.end_with("no_route")
        return False
    tls = origin.config.tls
    if tls is None:
        return True
    prefix = conn.extras.prefix if conn.extras is not None else b""
    stream = TlsStream(socket_stream(conn.trio_client()), tls.context, server_side=True, received=prefix)
    try:
        await stream.do_handshake()
    except TlsError as exc:
        origin.tls_counts["handshake_failed"] += 1
        log.debug("listener %s: TLS handshake with %s failed: %s", origin.name, conn.peer[0], exc.reason)
        conn.end_with("handshake_failed")
        return False
    extras = conn.more
    extras.prefix = b""  # the handshake took them
    extras.client_tls = stream
    return True


async def _route(conn: Connection) -> tuple[Pool | None, bytes] | None:
    """The pool the ClientHello asks for (None: the fallback) and the bytes read; None if the client left."""
    origin = conn.origin
    reader = HelloReader()
    hello = await _read_hello(conn.client_sock, reader)
    if hello is None:
        return None
    counts = origin.tls_counts
    if hello.status == "hello":
        name = origin.routes.pick(hello.server_name, hello.alpn)
        pool = origin.pools.get(name) if name else None
        if pool is not None:
            counts["routed"] += 1
            return pool, bytes(reader.data)
        counts["fallback"] += 1
    elif hello.status == "not_tls":
        counts["not_tls"] += 1
    else:
        counts["bad_hello"] += 1
        log.debug("listener %s: unreadable ClientHello: %s", origin.name, hello.error)
    return origin.pool, bytes(reader.data)


async def _read_hello(client: _socket.socket, reader: HelloReader) -> Hello | None:
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
