"""One health check of one server: a TCP connect or an HTTP/1.1 GET spoken with h11.

Each probe returns `(ok, reason)`; the reason is what the logs show when the
state changes: "refused", "timeout", "status 503", "body lacks 'up'", …
The whole probe (connect, request, response) is bounded by `timeout`.

A probe that fails for lack of something local (descriptors, buffers,
memory: `LOCAL_SHORTAGE_ERRNOS`, as for client connects) raises
`OutOfResources` instead: it says nothing about the server, so the checker
must not count it against it.

A probe sends no PROXY header unless given one (`health.send_proxy = true`
for servers that refuse connections without it): then the header, which
names no client (v1 UNKNOWN, v2 LOCAL), is the first thing sent.
"""

from __future__ import annotations

from typing import Final

import h11
import trio

from trioanubis.config import HealthConfig, TlsClient
from trioanubis.connection import LOCAL_SHORTAGE_ERRNOS, close_socket, open_server_socket
from trioanubis.errors import ConnectFailed, OutOfResources
from trioanubis.pool import Server
from trioanubis.tls_stream import TlsError, TlsStream

# The most of a health response body we read: enough for any status page
# that says "up", small enough that a misbehaving server cannot bloat us.
MAX_BODY: Final = 65536
MAX_HEADERS: Final = 16384

Result = tuple[bool, str]


async def probe(
    server: Server, config: HealthConfig, proxy_header: bytes = b"", tls: TlsClient | None = None
) -> Result:
    """Run one check of `config.check` kind against `server`, after `proxy_header` if given.

    With `tls` (the pool originates TLS) the check includes the handshake, so a
    certificate that does not verify fails it, and an http check runs over it.
    Raises OutOfResources on a local shortage."""
    with trio.move_on_after(config.timeout):
        try:
            sock = await open_server_socket(server, config.timeout)
        except OutOfResources:
            raise
        except ConnectFailed as exc:
            return False, exc.reason
        try:
            if config.check == "tcp" and not proxy_header and tls is None:
                return True, "connected"
            stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            if proxy_header:
                try:
                    await stream.send_all(proxy_header)
                except (OSError, trio.BrokenResourceError):
                    return False, "reset"
            if tls is not None:
                stream = TlsStream(stream, tls.context, server_side=False,
                                   server_hostname=tls.sni or server.address.host)  # fmt: skip
                try:
                    await stream.do_handshake()
                except TlsError as exc:
                    return False, exc.reason
            if config.check == "tcp":
                return True, "connected"
            return await _http_check(stream, server, config)
        finally:
            close_socket(sock)
    return False, "timeout"


async def _http_check(stream: trio.abc.Stream, server: Server, config: HealthConfig) -> Result:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
    host = config.host or str(server.address)
    request = h11.Request(
        method="GET",
        target=config.path,
        headers=[("Host", host), ("User-Agent", "trioanubis-health"), ("Connection", "close")],
    )
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, body = await _read_response(stream, conn)
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if isinstance(cause, OSError) and cause.errno in LOCAL_SHORTAGE_ERRNOS:
            raise OutOfResources(f"checking {server.address}: {cause.strerror}", "out of resources") from exc
        return False, "reset"
    except h11.RemoteProtocolError as exc:
        return False, f"bad response: {exc}"
    if status != config.expect_status:
        return False, f"status {status}"
    if config.expect_body and config.expect_body.encode() not in body:
        return False, f"body lacks {config.expect_body!r}"
    return True, f"status {status}"


async def _read_response(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_HEADERS)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data[: MAX_BODY - len(body)]
            if len(body) >= MAX_BODY:
                return status, bytes(body)
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            if not status:
                raise h11.RemoteProtocolError("connection closed before a response")
            return status, bytes(body)
