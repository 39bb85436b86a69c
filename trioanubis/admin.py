"""The admin endpoint: HTTP/1.1 spoken with h11, in its own branch of the nursery tree.

Theory of operation: `serve_admin` binds, reports its address, and serves
each connection in its own task. `route` is the whole API and is sans-IO:
method, path, headers and body in, status, content type and body out, so it
is tested without sockets. The I/O shell around it bounds everything a
client can make us hold: the request head (16 KiB), the body (64 KiB), the
time to send one request (10 s), and the number of admin connections (64).
Anything malformed gets a 4xx or a closed connection; nothing here can
disturb the proxy beyond the admin task that serves the bad client.

    GET  /                                       the dashboard (HTML; see dashboard.py)
    GET  /stats                                  JSON: listeners, pools, servers
    GET  /metrics                                Prometheus text format
    GET  /healthz                                200 while the process runs
    GET  /readyz                                 200 when serving, 503 otherwise
    POST /pools/{pool}/servers/{server}/drain    no new connections
    POST /pools/{pool}/servers/{server}/enable   back in rotation
    POST /pools/{pool}/servers/{server}/weight   body {"weight": N}
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import h11
import trio

from trioanubis import dashboard
from trioanubis.config import Address, AdminConfig
from trioanubis.errors import AnubisError
from trioanubis.metrics import prometheus, server_stats, stats

if TYPE_CHECKING:
    from trioanubis.app import Balancer

log = logging.getLogger("trioanubis.admin")

MAX_HEAD: Final = 16384
MAX_BODY: Final = 65536
# A client gets this long to send one whole request: slow senders are cut.
REQUEST_TIMEOUT: Final = 10.0
# Admin connections served at once; beyond it new ones are closed at once so a
# flood of admin clients cannot use up the proxy's file descriptors.
MAX_ADMIN_CONNECTIONS: Final = 64
PROMETHEUS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, document: Any) -> Reply:
    return Reply(status, JSON_TYPE, json.dumps(document, indent=1).encode() + b"\n")


def error_reply(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


def page_reply(status: int, body: bytes, cache: str) -> Reply:
    """The dashboard or its login page; a 401 still says which scheme the API takes."""
    challenge = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
    headers = (("Cache-Control", cache), *challenge, *dashboard.PAGE_HEADERS)
    return Reply(status, dashboard.HTML_TYPE, body, headers)


def authorised(token: str, headers: list[tuple[bytes, bytes]]) -> bool:
    if not token:
        return True
    expected = f"Bearer {token}".encode()
    return any(
        name == b"authorization" and hmac.compare_digest(value, expected) for name, value in headers
    )


def route(
    balancer: Balancer, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, token: str
) -> Reply:
    """The admin API, without I/O."""
    if not authorised(token, headers):
        if dashboard.is_page(method, path):
            return page_reply(401, dashboard.login_page(), dashboard.LOGIN_CACHE)
        return Reply(401, JSON_TYPE, b'{"error": "unauthorised"}\n', (("WWW-Authenticate", "Bearer"),))
    path = path.split("?", 1)[0]
    if path in dashboard.PATHS:
        if method not in ("GET", "HEAD"):
            return error_reply(405, f"{path} takes GET")
        return page_reply(200, dashboard.page(), dashboard.PAGE_CACHE)
    if path in ("/stats", "/metrics", "/healthz", "/readyz"):
        if method not in ("GET", "HEAD"):
            return error_reply(405, f"{path} takes GET")
        if path == "/stats":
            return json_reply(200, stats(balancer))
        if path == "/metrics":
            return Reply(200, PROMETHEUS_TYPE, prometheus(balancer).encode())
        if path == "/healthz":
            return Reply(200, "text/plain", b"ok\n")
        ready = balancer.is_ready()
        return Reply(200 if ready else 503, "text/plain", b"ready\n" if ready else b"not ready\n")
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if len(parts) == 5 and parts[0] == "pools" and parts[2] == "servers":
        if method != "POST":
            return error_reply(405, f"{path} takes POST")
        return _server_action(balancer, parts[1], parts[3], parts[4], body)
    return error_reply(404, f"no such endpoint: {path}")


def _server_action(balancer: Balancer, pool_name: str, key: str, action: str, body: bytes) -> Reply:
    pool = balancer.pools.get(pool_name)
    if pool is None:
        return error_reply(404, f"no pool {pool_name!r}")
    server = pool.find(key)
    if server is None:
        return error_reply(404, f"pool {pool_name!r} has no server {key!r}")
    if action == "drain":
        pool.set_draining(server, True)
    elif action == "enable":
        pool.set_draining(server, False)
    elif action == "weight":
        try:
            weight = json.loads(body or b"null")["weight"]
        except (ValueError, TypeError, KeyError):
            return error_reply(400, 'the body must be JSON like {"weight": 3}')
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
            return error_reply(400, f"weight must be an integer from 0 to 1000000, got {weight!r}")
        pool.set_weight(server, weight)
        log.warning("pool %s: server %s weight set to %d", pool.name, server.name, weight)
    else:
        return error_reply(404, f"no such action {action!r} (drain, enable, weight)")
    return json_reply(200, server_stats(server))


async def serve_admin(
    balancer: Balancer,
    config: AdminConfig,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on `config.bind` until cancelled."""
    host = config.bind.host or "0.0.0.0"
    try:
        listeners = await trio.open_tcp_listeners(config.bind.port, host=host)
    except OSError as exc:
        raise AnubisError(f"admin: binding {config.bind}: {exc.strerror or exc}") from None
    if not config.token and not _is_loopback(host):
        log.warning("admin: listening on %s without a token: anyone who can reach it can drain "
                    "servers; set [admin] token", config.bind)  # fmt: skip
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    bound = Address(bound_host, bound_port)
    log.info("admin: listening on %s", bound)
    task_status.started(bound)
    limiter = trio.CapacityLimiter(MAX_ADMIN_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _serve_connection(stream, balancer, config.token)
        finally:
            limiter.release()

    await trio.serve_listeners(handle, listeners)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _serve_connection(stream: trio.SocketStream, balancer: Balancer, token: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    async with stream:
        try:
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    request = await _read_request(stream, conn)
                    if request is None:
                        return
                    method, target, headers, body = request
                    reply = route(balancer, method, target, headers, body, token)
                    await _send(stream, conn, reply, head_only=method == "HEAD")
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                    continue
                return  # timed out: a slow sender is cut off
        except h11.RemoteProtocolError as exc:
            await _send_error(stream, conn, exc.error_status_hint, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[str, str, list[tuple[bytes, bytes]], bytes] | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_HEAD))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request.method.decode(), request.target.decode(), list(request.headers), bytes(body)
        else:  # ConnectionClosed, or PAUSED after the peer closed
            return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, reply: Reply, head_only: bool) -> None:
    headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
               *reply.extra_headers]  # fmt: skip
    data = conn.send(h11.Response(status_code=reply.status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, status: int, message: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        await _send(stream, conn, error_reply(status, message), head_only=False)
