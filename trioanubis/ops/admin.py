"""The admin endpoint: HTTP/1.1 spoken with h11, in its own branch of the nursery tree.

Theory of operation: `Admin.serve` binds, reports its address, and serves
each connection in its own task. `route` is the whole API and is sans-IO:
method, path, headers and body in, a `Reply` out, so it is tested without
sockets. The I/O shell around it keeps four promises:

- Nothing a caller sends can stop the process. Every connection runs inside
  a boundary: input errors get a 4xx; a bug (any other exception) gets a 500
  if a reply is still possible, is logged once per place it comes from with
  its traceback, counted in `internal_errors`, and the connection is closed.
  The body is bounded (4 KiB) and so is JSON nesting, so `json.loads` never
  recurses deeply.
- Nobody without the token can starve the admin. Each connection has a
  bound on sending one request (10 s, from its first byte, or from connect
  for the first request), on waiting idle between requests (30 s) and on its
  whole life (120 s; then the next reply says `Connection: close`). A
  request that fails auth gets its 401 and the connection is closed. When
  the 64 slots are taken, a newcomer takes the slot of an idle keep-alive
  connection first, else of the oldest connection that has not yet made an
  authorised request (`pick_victim`); only if every slot is an authorised
  request in progress is the newcomer closed.
- `/healthz` and `/readyz` answer without a token (they reveal nothing and
  Kubernetes probes cannot send one); everything else needs it when one is
  set. A reload can replace the token and the host names (`Admin.apply`);
  the bind address changes only at a restart.
- A web page the operator happens to open cannot use the operator's browser
  against the admin (`screen`, before any route, in the shell, so the
  workers' supervisor gets it too). A request whose `Host` is not an IP
  address, `localhost` or a name in `[admin] hosts` gets 421: a DNS-rebinding
  page reaches a loopback admin under its own domain name, and is then
  same-origin with it. A non-safe request that a browser marks as coming from
  another origin gets 403: Go 1.25's `net/http.CrossOriginProtection`
  (`Sec-Fetch-Site`, else `Origin` against `Host`). A request with neither
  header is not from a browser and passes: curl and scripts are not affected.
  Refusals are counted (`misdirected`, `cross_origin`) and logged once per
  offending value, method and path (at most 64 lines).

Accept errors that mean the process ran short (EMFILE, ENFILE, ENOBUFS,
ENOMEM) go to the proxy listeners' `AcceptBackoff`: logged once per episode,
slept on, retried.

    GET  /                                       the dashboard (HTML; see dashboard.py)
    GET  /stats                                  JSON: listeners, pools, servers
    GET  /metrics                                Prometheus text format
    GET  /healthz                                200 while the process runs (no token needed)
    GET  /readyz                                 200 while this balancer takes clients (no token needed)
    GET  /readyz?upstream=1                      ... and every pool has a server to send them to
    GET  /pools/{pool}/servers/{server}/faults   the injected faults in effect (trioanubis.faults)
    GET  /fleet                                  JSON: the fleet's instances and where their views
                                                 of the servers disagree ([cluster]; fleet/)

Every change is a command (control.py), and `COMMAND_ROUTES` is the one
table of them: `route` turns a request to one of its paths into a `Pending`
command (or a 400 / 405), and whoever serves the admin carries it out with
`carry_out`: a balancer on itself (`Balancer.command`), the workers'
supervisor on its view and then in every worker. Nothing is forwarded by
hand, so a route added to the table reaches every worker.

    POST /pools/{pool}/servers/{server}/drain    no new connections
    POST /pools/{pool}/servers/{server}/enable   back in rotation
    POST /pools/{pool}/servers/{server}/weight   body {"weight": N}
    PUT  /pools/{pool}/servers/{server}/faults   body {"latency": "200ms", ...}: replace them
    DELETE /pools/{pool}/servers/{server}/faults no faults on this server (new connections)
    POST /pools/{pool}/servers                   body: a server entry as in the file (201)
    DELETE /pools/{pool}/servers/{server}        no new connections; gone once its open ones end
"""

from __future__ import annotations

import contextlib
import hmac
import http
import ipaddress
import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, final
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from trioanubis.config import Address, AdminConfig, ConfigError, parse_server, show_value
from trioanubis.control import (
    AddServer,
    ClearFaults,
    Command,
    CommandError,
    Drain,
    Enable,
    RemoveServer,
    SetFaults,
    SetWeight,
    faults_of,
    new_server_path,
)
from trioanubis.errors import AnubisError
from trioanubis.ops import dashboard
from trioanubis.ops.metrics import prometheus, server_stats, stats
from trioanubis.proxy.faults import describe
from trioanubis.proxy.listener import AcceptBackoff

if TYPE_CHECKING:
    from trioanubis.ops.view import View
    from trioanubis.pool import Server

log = logging.getLogger("trioanubis.admin")

MAX_HEAD: Final = 16384
# The requests with a body are {"weight": N}, a faults table and a server entry: 4 KiB is plenty.
MAX_BODY: Final = 4096
# A lingering close (after an error answered before the request was read): how long, how much.
LINGER_TIME: Final = 2.0
LINGER_BYTES: Final = 256 * 1024
# {"weight": N} and a faults table nest one level, a server entry with its faults two;
# json.loads recurses once per level, so a deeper body is refused before it is parsed.
MAX_JSON_DEPTH: Final = 4
# A client gets this long to send one whole request (from its first byte, or
# from connecting for the first request): slow senders are cut. Sending a
# reply to a client that does not read is bounded the same way.
REQUEST_TIMEOUT: Final = 10.0
# How long a keep-alive connection may wait idle for its next request: longer
# than a 15 s Prometheus scrape interval, so scrapes reuse their connection.
KEEPALIVE_TIMEOUT: Final = 30.0
# After this, a connection's next reply says "Connection: close": no caller
# holds a slot for ever, however busy it keeps it.
CONNECTION_LIFETIME: Final = 120.0
# Admin connections served at once, so admin clients cannot use up the
# proxy's file descriptors; beyond it a newcomer takes a slot (`pick_victim`).
MAX_ADMIN_CONNECTIONS: Final = 64
# Answered without a token: they reveal nothing, and probes cannot send one.
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
# Methods that never change anything here; a browser may send them from anywhere (as Go's list).
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# What `Sec-Fetch-Site` says when the operator's own page, or the operator typing a URL, sent it.
OWN_SITE: Final = frozenset({b"same-origin", b"none"})
# Distinct refusals logged (offending value, method, path); beyond that they are only counted.
MAX_LOGGED_REFUSALS: Final = 64
PROMETHEUS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this reply


def json_reply(status: int, document: Any) -> Reply:
    return Reply(status, JSON_TYPE, json.dumps(document, indent=1).encode() + b"\n")


def error_reply(status: int, message: str, *, close: bool = False) -> Reply:
    reply = json_reply(status, {"error": message})
    return Reply(reply.status, reply.content_type, reply.body, close=close)


UNAUTHORISED: Final = Reply(
    401, JSON_TYPE, b'{"error": "unauthorised"}\n', (("WWW-Authenticate", "Bearer"),), close=True
)


def page_reply(status: int, body: bytes, cache: str) -> Reply:
    """The dashboard or its login page; a 401 still says which scheme the API takes."""
    challenge = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
    headers = (("Cache-Control", cache), *challenge, *dashboard.PAGE_HEADERS)
    return Reply(status, dashboard.HTML_TYPE, body, headers, close=status == 401)  # a 401 closes


def authorised(token: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """With a token set: exactly one Authorization header, and it carries the token."""
    if not token:
        return True
    given = [value for name, value in headers if name == b"authorization"]
    return len(given) == 1 and hmac.compare_digest(given[0], f"Bearer {token}".encode())


def route(
    view: View, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, token: str
) -> Reply | Pending:
    """The admin API, without I/O (`screen` has already let the request in): a reply, or for a
    change the command to carry out (`COMMAND_ROUTES`)."""
    target, path = path, path.split("?", 1)[0]
    if path not in OPEN_PATHS and not authorised(token, headers):
        if dashboard.is_page(method, path):  # a browser's first visit: a page that asks for the token
            return page_reply(401, dashboard.login_page(), dashboard.LOGIN_CACHE)
        return UNAUTHORISED
    if path in dashboard.PATHS:
        if method not in ("GET", "HEAD"):
            return error_reply(405, f"{path} takes GET")
        return page_reply(200, dashboard.page(), dashboard.PAGE_CACHE)
    if path in ("/stats", "/metrics", *OPEN_PATHS):
        if method not in ("GET", "HEAD"):
            return error_reply(405, f"{path} takes GET")
        if path == "/stats":
            return json_reply(200, stats(view))
        if path == "/metrics":
            return Reply(200, PROMETHEUS_TYPE, prometheus(view).encode())
        if path == "/healthz":
            return Reply(200, "text/plain", b"ok\n")
        upstream = upstream_asked(target)
        if isinstance(upstream, Reply):
            return upstream
        return ready_reply(view.is_ready() and (not upstream or view.has_upstream()))
    if path == "/fleet":
        return _fleet(view, method)
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if method in ("GET", "HEAD") and len(parts) == 5 and parts[::2] == ["pools", "servers", "faults"]:
        return _show_faults(view, parts[1], parts[3])
    return command_for(method, path, parts, body) or error_reply(404, f"no such endpoint: {path}")


def _fleet(view: View, method: str) -> Reply:
    if method not in ("GET", "HEAD"):
        return error_reply(405, "/fleet takes GET")
    document = view.fleet_document()
    if document is None:
        return error_reply(404, "/fleet: this balancer is in no fleet (no [cluster] table)")
    return json_reply(200, document)


def upstream_asked(target: str) -> bool | Reply:
    """Whether `/readyz?upstream=1` (or bare `?upstream`) asks about the servers too; 400 for another value.

    Other parameters are ignored, as Kubernetes' `/readyz?verbose` would be.
    """
    values = [v for k, v in parse_qsl(target.partition("?")[2], keep_blank_values=True) if k == "upstream"]
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("", "1", "0"):
        return error_reply(400, "/readyz: upstream takes 1 (ask about the servers too) or 0")
    return values[0] != "0"


def ready_reply(ready: bool) -> Reply:
    return Reply(200 if ready else 503, "text/plain", b"ready\n" if ready else b"not ready\n")


# ------------------------------------------------- who may ask: Host and Origin


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request `screen` turns away before any route sees it."""

    kind: Literal["misdirected", "cross_origin"]
    reply: Reply
    why: str  # for the log line: the offending header values, shown safely


# host[:port], where host is [IPv6] or anything without colons and brackets (checked after).
_HOST_SYNTAX: Final = re.compile(r"(?:\[([0-9a-f:.]+)\]|([^:\[\]]+))(?::([0-9]{1,5}))?", re.ASCII)


def host_allowed(value: bytes, names: frozenset[str]) -> bool:
    """A Host value naming an IP address ([v6] too), localhost or one of `names`, with or without a port."""
    try:
        text = value.decode("ascii").lower()
    except UnicodeDecodeError:
        return False
    match = _HOST_SYNTAX.fullmatch(text)
    if match is None or (match[3] is not None and int(match[3]) > 65535):
        return False
    if match[1] is not None:
        return _is_address(match[1], ipaddress.IPv6Address)
    return _is_address(match[2], ipaddress.IPv4Address) or match[2] == "localhost" or match[2] in names


def _is_address(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _first(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The first value of header `name`, b"" when absent (Go's `Header.Get`)."""
    return next((value for key, value in headers if key == name), b"")


def origin_host(origin: bytes) -> bytes | None:
    """The host[:port] of an Origin value (Go's `url.Parse(origin).Host`); None where Go fails to parse."""
    if any(byte <= 0x20 or byte == 0x7F for byte in origin):
        return None  # url.Parse refuses control characters and spaces; urlsplit would drop some
    try:
        netloc = urlsplit(origin.decode("latin-1")).netloc
    except ValueError:  # unbalanced brackets, a bad port
        return None
    return netloc.rpartition("@")[2].encode("latin-1")


def cross_origin(method: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a browser's cross-origin request may not do `method`, or None: `CrossOriginProtection.Check`.

    Go 1.25's algorithm, without its trusted origins and bypass patterns (the
    admin has no cross-origin callers to trust): safe methods pass; else a
    `Sec-Fetch-Site` other than same-origin or none refuses; else an `Origin`
    whose host is not the request's `Host` refuses; a request with neither
    header is not from a browser and passes.
    """
    if method in SAFE_METHODS:
        return None
    site = _first(headers, b"sec-fetch-site")
    if site:
        return None if site in OWN_SITE else f"Sec-Fetch-Site: {_show(site)}"
    origin = _first(headers, b"origin")
    if not origin:
        return None
    host = _first(headers, b"host")
    if host and origin_host(origin) == host:  # no Host never matches (Go's "" == "" would)
        return None
    return f"Origin {_show(origin)} is not Host {_show(host)}"


def screen(
    method: str, target: str, headers: list[tuple[bytes, bytes]], names: frozenset[str]
) -> Refusal | None:
    """The checks before any route: 421 for a Host not ours, then 403 for a browser's cross-origin change.

    The probes (`OPEN_PATHS`) skip the Host check: they reveal nothing, and
    a prober may name the pod however it likes. A request without Host
    (HTTP/1.0) passes it: a browser always sends one.
    """
    hosts = [value for name, value in headers if name == b"host"]
    if target.split("?", 1)[0] not in OPEN_PATHS and (
        len(hosts) > 1 or (hosts and not host_allowed(hosts[0], names))
    ):
        shown = ", ".join(_show(h) for h in hosts)
        message = (f"misdirected request: Host {shown} is not an IP address, localhost or a name in "
                   "[admin] hosts")  # fmt: skip
        return Refusal("misdirected", error_reply(421, message, close=True), f"Host {shown}")
    why = cross_origin(method, headers)
    if why is not None:
        return Refusal("cross_origin", error_reply(403, f"cross-origin request refused ({why})"), why)
    return None


def _show(value: bytes, limit: int = 80) -> str:
    """A header value for a message or log line: quoted, escaped, cut short."""
    text = repr(value[:limit].decode("latin-1"))
    return text + "…" if len(value) > limit else text


def json_depth(text: str) -> int:
    """How deeply `text` nests arrays and objects, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json_body(body: bytes, shape: str) -> Any:
    """The JSON document in `body`, depth-checked before parsing; ValueError saying `shape` otherwise."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{shape} (UTF-8)") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{shape}; it nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text or "null")
    except ValueError:
        raise ValueError(shape) from None


def json_body(body: bytes, shape: str) -> Any:
    """`parse_json_body` for a command's body: CommandError (400) saying `shape` otherwise."""
    try:
        return parse_json_body(body, shape)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _show_faults(view: View, pool_name: str, key: str) -> Reply:
    """GET a server's injected faults (PUT and DELETE are commands)."""
    pool = view.pools.get(pool_name)
    server = None if pool is None else pool.find(key)
    if pool is None:
        return error_reply(404, f"no pool {show_value(pool_name)}")
    if server is None:
        return error_reply(404, f"pool {show_value(pool_name)} has no server {show_value(key)}")
    return json_reply(200, faults_answer(pool.name, server))


def faults_answer(pool: str, server: Server) -> dict[str, Any]:
    return {"pool": pool, "server": server.name, "faults": describe(server.faults)}


# ------------------------------------------------------------- commands


Params = Mapping[str, str]


def _weight(params: Params, body: bytes) -> Command:
    shape = 'the body must be JSON like {"weight": 3}'
    data = json_body(body, shape)
    if not isinstance(data, dict) or "weight" not in data:
        raise CommandError(shape)
    return SetWeight(params["pool"], params["server"], data["weight"])


def _set_faults(params: Params, body: bytes) -> Command:
    table = json_body(body, 'the body must be a JSON object like {"latency": "200ms"}')
    return SetFaults(params["pool"], params["server"], faults_of(table))


def _add_server(params: Params, body: bytes) -> Command:
    shape = 'the body must be a server entry as JSON, like {"address": "10.0.0.5:8080", "name": "s3"}'
    pool = params["pool"]
    try:
        entry = parse_server(json_body(body, shape), new_server_path(pool))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    return AddServer(pool, entry)


def _stats_answer(command: Command, server: Server) -> Any:
    return server_stats(server)


def _faults_answer(command: Command, server: Server) -> Any:
    return faults_answer(command.pool, server)


@dataclass(frozen=True, slots=True)
class CommandRoute:
    """One change the admin takes: a method and a path pattern, the command a request builds
    (control.py), and how the server it concerns is shown in the answer."""

    method: str
    pattern: str  # segments; "{name}" binds the (URL-decoded) segment there
    build: Callable[[Params, bytes], Command]
    status: int = 200
    answer: Callable[[Command, Server], Any] = _stats_answer

    def bind(self, parts: list[str]) -> dict[str, str] | None:
        """The pattern's names bound to `parts`, or None when the path is not this pattern's."""
        pattern = self.pattern.strip("/").split("/")
        if len(pattern) != len(parts):
            return None
        bound = {}
        for want, part in zip(pattern, parts, strict=True):
            if want.startswith("{"):
                bound[want.strip("{}")] = part
            elif want != part:
                return None
        return bound


def _on_server(kind: Callable[[str, str], Command]) -> Callable[[Params, bytes], Command]:
    """A builder for a command whose path names a pool and a server and whose body is ignored."""
    return lambda params, body: kind(params["pool"], params["server"])


# Every change the admin API makes, and nothing else: admin.route builds these commands, the
# single process carries them out on itself (`Balancer.command`), the workers' supervisor on its
# view and then in every worker (workers/supervisor.py). A route added here reaches every worker.
COMMAND_ROUTES: Final[tuple[CommandRoute, ...]] = (
    CommandRoute("POST", "/pools/{pool}/servers/{server}/drain", _on_server(Drain)),
    CommandRoute("POST", "/pools/{pool}/servers/{server}/enable", _on_server(Enable)),
    CommandRoute("POST", "/pools/{pool}/servers/{server}/weight", _weight),
    CommandRoute("PUT", "/pools/{pool}/servers/{server}/faults", _set_faults, answer=_faults_answer),
    CommandRoute("DELETE", "/pools/{pool}/servers/{server}/faults", _on_server(ClearFaults),
                 answer=_faults_answer),
    CommandRoute("POST", "/pools/{pool}/servers", _add_server, status=201),
    CommandRoute("DELETE", "/pools/{pool}/servers/{server}", _on_server(RemoveServer)),
)


@dataclass(frozen=True, slots=True)
class Pending:
    """A request the route table turned into a command: whoever serves the admin carries it out
    (`carry_out`) and answers with the route's status and view of the server."""

    route: CommandRoute
    command: Command


def command_for(method: str, path: str, parts: list[str], body: bytes) -> Pending | Reply | None:
    """The command a request asks for; a 405 or 400 reply; None when no command route has its path."""
    allowed = []
    for candidate in COMMAND_ROUTES:
        params = candidate.bind(parts)
        if params is None:
            continue
        if candidate.method != method:
            allowed.append(candidate.method)
            continue
        try:
            return Pending(candidate, candidate.build(params, body))
        except CommandError as exc:
            return error_reply(exc.status, str(exc))
    if allowed:
        return error_reply(405, f"{path} takes {' or '.join(allowed)}")
    return None


async def carry_out(pending: Pending, execute: Callable[[Command], Awaitable[Server]]) -> Reply:
    """Carry a command out with `execute` (a balancer's, or the supervisor's) and answer it."""
    try:
        server = await execute(pending.command)
    except CommandError as exc:
        return error_reply(exc.status, str(exc))
    return json_reply(pending.route.status, pending.route.answer(pending.command, server))


# ----------------------------------------------------------------- slots


@dataclass(eq=False, slots=True)
class Slot:
    """One admin connection, as the slot allocator sees it."""

    since: float  # when its current phase (request, or idle wait) began
    idle: bool = False  # a keep-alive connection waiting for its next request
    proven: bool = False  # it has made a request with the token (never, when none is set)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def pick_victim(slots: Iterable[Slot]) -> Slot | None:
    """The connection a newcomer replaces: idle ones first, then unproven ones, oldest first.

    None when every slot is an authorised request in progress: then the
    newcomer is the one turned away.
    """
    candidates = [s for s in slots if s.idle or not s.proven]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (not s.idle, s.since))


Incoming = tuple[str, str, list[tuple[bytes, bytes]], bytes]  # method, target, headers, body
# An API in place of `route` (the workers' supervisor asks its workers): request and token in.
Router = Callable[[str, str, list[tuple[bytes, bytes]], bytes, str], Awaitable[Reply]]


# How the admin endpoint gets its listening sockets: trio's by default; an upgrade's or socket
# activation's inherited ones otherwise (upgrade.py).
AdminOpener = Callable[[Address], Awaitable[list[trio.SocketListener]]]


async def open_admin_listeners(bind: Address) -> list[trio.SocketListener]:
    """Bind the admin endpoint's sockets ("" as host: every IPv4 interface)."""
    try:
        return await trio.open_tcp_listeners(bind.port, host=bind.host or "0.0.0.0")
    except OSError as exc:
        raise AnubisError(f"admin: binding {bind}: {exc.strerror or exc}") from None


@final
class Admin:
    """The admin endpoint of one balancer (seen as a `View`): its slots, counters and reloadable token."""

    def __init__(self, view: View, config: AdminConfig, open_listeners: AdminOpener | None = None, *,
                 router: Router | None = None) -> None:  # fmt: skip
        self.view = view
        self.open_listeners: AdminOpener = open_listeners or open_admin_listeners
        self.router = router
        self.config = config
        self.token = config.token
        self.backoff = AcceptBackoff("admin", log)
        self.internal_errors = 0
        self.evicted = 0  # connections closed to make room for a newcomer
        self.rejected = 0  # newcomers closed because every slot was busy with authorised work
        self.misdirected = 0  # requests with a Host not ours (421)
        self.cross_origin = 0  # a browser's cross-origin changes refused (403)
        self.hosts = frozenset(config.hosts)
        self.bound: Address | None = None
        self._slots: set[Slot] = set()
        self._logged: set[tuple[str, str, int]] = set()  # the places internal errors came from
        self._refusals_logged: set[tuple[str, str, str, str]] = set()

    @property
    def accept_overloads(self) -> int:
        """Accepts that failed for lack of descriptors or memory (read by metrics.py)."""
        return self.backoff.overloads

    def apply(self, config: AdminConfig) -> None:
        """Take a reloaded [admin] table: token and host names now, the bind address at the next restart."""
        if config.bind != self.config.bind:
            log.warning("reload: admin: the new bind %s takes effect at the next restart; still on %s",
                        config.bind, self.bound or self.config.bind)  # fmt: skip
        if config.token != self.token:
            log.info("reload: admin: token replaced; the old one is refused from now on")
        if frozenset(config.hosts) != self.hosts:
            log.info("reload: admin: host names now %s", ", ".join(config.hosts) or "none")
        self.token = config.token
        self.hosts = frozenset(config.hosts)
        self.config = config

    async def serve(self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the admin API on `config.bind` until cancelled."""
        host = self.config.bind.host or "0.0.0.0"
        listeners = await self.open_listeners(self.config.bind)
        if not self.token and not _is_loopback(host):
            log.warning("admin: listening on %s without a token: anyone who can reach it can drain "
                        "servers; set [admin] token", self.config.bind)  # fmt: skip
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        self.bound = Address(bound_host, bound_port)
        log.info("admin: listening on %s", self.bound)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(self.bound)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    await self.backoff.back_off(exc)
                    continue
                if self.backoff.overloaded:
                    self.backoff.recovered()
                nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection, in a slot, inside the boundary: nothing it raises goes further."""
        if len(self._slots) >= MAX_ADMIN_CONNECTIONS:
            victim = pick_victim(self._slots)
            if victim is None:
                self.rejected += 1
                await stream.aclose()
                return
            self.evicted += 1
            self._slots.discard(victim)
            victim.scope.cancel()
        slot = Slot(trio.current_time())
        self._slots.add(slot)
        try:
            with slot.scope:
                async with stream:
                    await self._serve_connection(stream, slot)
        except Exception as exc:  # the boundary: a bug here is counted, never a process exit
            self._internal_error(exc)
        finally:
            self._slots.discard(slot)

    def _internal_error(self, exc: Exception) -> None:
        """Count a bug; log it with its traceback the first time it comes from that place."""
        self.internal_errors += 1
        frames = traceback.extract_tb(exc.__traceback__)
        where = (type(exc).__name__, frames[-1].filename, frames[-1].lineno or 0) if frames else ("", "", 0)
        if where not in self._logged:
            self._logged.add(where)
            log.error("admin: internal error (%s); answered 500 and counted, further ones from the "
                      "same place are only counted", type(exc).__name__, exc_info=exc)  # fmt: skip

    async def _serve_connection(self, stream: trio.SocketStream, slot: Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        end_of_life = slot.since + CONNECTION_LIFETIME
        deadline = slot.since + REQUEST_TIMEOUT
        try:
            while True:
                request = await _read_request(stream, conn, slot, min(deadline, end_of_life))
                if request is None:
                    return  # closed, or timed out
                reply = await self._answer(request)
                # With no token set nobody is proven: anyone may take anyone's slot.
                slot.proven = slot.proven or (bool(self.token) and authorised(self.token, request[2]))
                close = reply.close or trio.current_time() >= end_of_life
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _send(stream, conn, reply, head_only=request[0] == "HEAD", close=close)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                slot.idle, slot.since = True, trio.current_time()
                deadline = slot.since + KEEPALIVE_TIMEOUT
        except h11.RemoteProtocolError as exc:
            await _send_error(stream, conn, exc.error_status_hint, str(exc))
            await _linger(stream)  # the client may still be sending what we refused to read
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return
        except Exception:
            await _send_error(stream, conn, 500, "internal error")
            raise

    async def _answer(self, request: Incoming) -> Reply:
        method, target, headers, body = request
        refusal = screen(method, target, headers, self.hosts)
        if refusal is not None:
            self._refused(method, target, refusal)
            return refusal.reply
        try:
            if self.router is not None:
                return await self.router(method, target, headers, body, self.token)
            answer = route(self.view, method, target, headers, body, self.token)
            return await carry_out(answer, self.view.command) if isinstance(answer, Pending) else answer
        except Exception as exc:
            self._internal_error(exc)
            return error_reply(500, "internal error", close=True)

    def _refused(self, method: str, target: str, refusal: Refusal) -> None:
        """Count a refusal; log it the first time its offending value comes for that method and path."""
        if refusal.kind == "misdirected":
            self.misdirected += 1
            why = ("not an IP address, localhost or a name in [admin] hosts: a DNS-rebinding page would "
                   "send its own name (if the name is yours, add it to [admin] hosts)")  # fmt: skip
        else:
            self.cross_origin += 1
            why = "a page from another origin tried to change the balancer through a browser"
        key = (refusal.kind, refusal.why, method, target.split("?", 1)[0])
        if key in self._refusals_logged or len(self._refusals_logged) >= MAX_LOGGED_REFUSALS:
            return
        self._refusals_logged.add(key)
        shown = _show(target.encode(errors="replace"), 60)
        log.warning("admin: refused %s %s with %s (%d): %s; further ones alike are only counted",
                    method, shown, refusal.why, refusal.reply.status, why)  # fmt: skip


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection, slot: Slot, deadline: float
) -> Incoming | None:
    """The next whole request, or None if the peer closed or the deadline passed.

    While the connection is idle the deadline is the keep-alive one; the
    first byte of a request moves it to `REQUEST_TIMEOUT` from then.
    """
    request: h11.Request | None = None
    body = bytearray()
    head = 0  # bytes received while no whole head has come (h11 bounds only a head still incomplete)
    with trio.move_on_at(deadline) as scope:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if request is None and head >= MAX_HEAD:
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
                data = await stream.receive_some(MAX_HEAD - head if request is None else MAX_HEAD)
                if request is None:
                    head += len(data)
                if slot.idle and data:
                    slot.idle, slot.since = False, trio.current_time()
                    scope.deadline = slot.since + REQUEST_TIMEOUT
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                slot.idle = False
                _check_length(event)
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = list(request.headers)
                return request.method.decode(), request.target.decode(), headers, bytes(body)
            else:  # ConnectionClosed, or PAUSED after the peer closed
                return None
    return None


async def _linger(stream: trio.SocketStream) -> None:
    """Close as nginx's lingering close does, after answering a request we did not read to its end.

    Closing a socket with unread bytes makes the kernel send a reset, which
    can destroy the answer before the client reads it (a 413 for a large
    body). So: send EOF, then read and drop what still comes, up to
    `LINGER_BYTES` within `LINGER_TIME`, and only then close.
    """
    with trio.move_on_after(LINGER_TIME), contextlib.suppress(trio.BrokenResourceError,
                                                              trio.ClosedResourceError, OSError):  # fmt: skip
        await stream.send_eof()
        dropped = 0
        while dropped < LINGER_BYTES:
            data = await stream.receive_some(MAX_HEAD)
            if not data:
                return
            dropped += len(data)


def _check_length(request: h11.Request) -> None:
    """Refuse a declared body over `MAX_BODY` before reading it."""
    for name, value in request.headers:
        if name == b"content-length" and int(value) > MAX_BODY:
            raise h11.RemoteProtocolError("request body too large", error_status_hint=413)


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, reply: Reply, *, head_only: bool, close: bool = False
) -> None:
    headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
               *reply.extra_headers, *((("Connection", "close"),) if close else ())]  # fmt: skip
    phrase = http.HTTPStatus(reply.status).phrase
    data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
    if not head_only:
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, status: int, message: str) -> None:
    """A last error reply, if the exchange still allows one; never raises for a gone peer."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    gone = (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError)
    with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(*gone):
        await _send(stream, conn, error_reply(status, message), head_only=False, close=True)
