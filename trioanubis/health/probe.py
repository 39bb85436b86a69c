"""One health check of one server: a TCP connect, an HTTP/1.1 GET spoken with h11,
or a send/expect conversation judged by `health/expect.py`.

Each probe returns `(ok, reason)`; the reason is what the logs show when the
state changes: "refused", "timeout", "status 503", "body lacks 'up'",
"expected '+PONG', got '-LOADING …'". The whole probe (connect, request,
response) is bounded by `timeout`. A conversation reads no more than its
matcher's `room`, so a server cannot make a check hold more than `expect_bytes`.

A probe that fails for lack of something local (descriptors, buffers,
memory: `LOCAL_SHORTAGE_ERRNOS`, as for client connects) raises
`OutOfResources` instead: it says nothing about the server, so the checker
must not count it against it.

A probe sends no PROXY header unless given one (`health.send_proxy = true`
for servers that refuse connections without it): then the header, which
names no client (v1 UNKNOWN, v2 LOCAL), is the first thing sent.
"""

from __future__ import annotations

import contextlib
from typing import Final

import h11
import trio

from trioanubis.config import HealthConfig, TlsClient
from trioanubis.errors import ConnectFailed, OutOfResources
from trioanubis.health.expect import Matcher, Plan, Verdict, plan_for, show
from trioanubis.pool import Server
from trioanubis.proxy.connect import LOCAL_SHORTAGE_ERRNOS, close_socket, open_server_socket
from trioanubis.tls.stream import TlsError, TlsStream

# The most of a health response body we read: enough for any status page
# that says "up", small enough that a misbehaving server cannot bloat us.
MAX_BODY: Final = 65536
MAX_HEADERS: Final = 16384
# One read of a conversation's reply (never more than the matcher's room).
READ_CHUNK: Final = 4096

Result = tuple[bool, str]


def plan_of(config: HealthConfig) -> Plan | None:
    """The conversation of a protocol check (None for tcp, http and none); built once per task."""
    if config.check in ("tcp", "http", "none"):
        return None
    return plan_for(config.check, send=config.send, expect=config.expect,
                    expect_regex=config.expect_regex, expect_bytes=config.expect_bytes,
                    user=config.user)  # fmt: skip


async def probe(
    server: Server,
    config: HealthConfig,
    plan: Plan | None = None,
    proxy_header: bytes = b"",
    tls: TlsClient | None = None,
) -> Result:
    """Run one check of `config.check` kind against `server` (`plan`: see `plan_of`), after
    `proxy_header` if given.

    With `tls` (the pool originates TLS) the check includes the handshake, so a
    certificate that does not verify fails it, and an http or protocol check runs over it.
    Raises OutOfResources on a local shortage."""
    matcher = plan.matcher() if plan is not None else None
    connected = False
    with trio.move_on_after(config.timeout):
        try:
            sock = await open_server_socket(server, config.timeout)
        except OutOfResources:
            raise
        except ConnectFailed as exc:
            return False, exc.reason
        connected = True
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
            if matcher is not None:
                assert plan is not None
                verdict = await _converse(stream, plan, matcher)
                return verdict.ok, verdict.reason
            return await _http_check(stream, server, config)
        finally:
            close_socket(sock)
    if connected and matcher is not None:
        return False, matcher.timed_out().reason
    return False, "timeout"


async def _converse(stream: trio.abc.Stream, plan: Plan, matcher: Matcher) -> Verdict:
    """Send the plan's request and feed the reply to `matcher` until it decides."""
    try:
        if plan.send:
            await stream.send_all(plan.send)
        verdict = None
        while verdict is None:
            data = await stream.receive_some(min(matcher.room, READ_CHUNK))
            verdict = matcher.feed(bytes(data)) if data else matcher.eof()
    except (OSError, trio.BrokenResourceError):
        after = f" after {show(bytes(matcher.received))}" if matcher.received else ""
        return Verdict(False, f"reset{after}")
    if verdict.ok and plan.farewell:
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await stream.send_all(plan.farewell)
    return verdict


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
