"""One HTTP/1.1 connection to one etcd endpoint: h11 over a Trio TCP or TLS stream, bounded.

Theory of operation: this is the socket boundary of the cluster package.
`HttpConnection.open` connects (TLS when the endpoint is https) and raises
`Unsent` if it cannot: the request never left, so trying the next endpoint
is always safe. After that, anything that breaks the connection (`OSError`,
Trio's broken or closed stream, an `ssl.SSLError`, the peer closing before
the answer is whole) is `Broken`: the request may have been applied. h11's
complaints about what the peer sent are `EtcdBadResponse`. Nothing else
leaves this module.

Bounds, so a hostile or broken server costs at most a fixed amount:
`MAX_HEAD` for everything before the response head is whole (h11's
`max_incomplete_event_size`, and a count of our own across informational
responses), a body over the caller's limit is refused while it arrives
(or at once from its Content-Length), and the caller bounds time.

A connection is reused for the next request only when h11 says both sides
are done, nothing came after the answer, and the idle socket has nothing
to read: a readable idle socket means the server closed it (or sent
something unasked), so it is dropped rather than risking a request into a
closed connection, or reading the next answer after stray bytes.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Final, final
from urllib.parse import urlsplit

import h11
import trio

from trioanubis.cluster.calls import Call
from trioanubis.cluster.errors import EtcdBadResponse, EtcdUnreachable, show

# The most of an answer's status line and headers (etcd's are ~350 bytes).
MAX_HEAD: Final = 16384
READ_SIZE: Final = 65536
# TCP keepalive on watch connections: a peer gone without a FIN is noticed in about 30 s
# (15 s idle, then 3 probes 5 s apart) instead of never, since a quiet watch sends nothing.
KEEPALIVE_IDLE: Final = 15
KEEPALIVE_INTERVAL: Final = 5
KEEPALIVE_PROBES: Final = 3
DEFAULT_PORT: Final = 2379


class Unsent(EtcdUnreachable):
    """Connecting to an endpoint failed: the request never left."""


class Broken(EtcdUnreachable):
    """The connection broke after the request began: it may have been applied."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    tls: bool
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The Host header."""
        return str(self).split("://", 1)[1]


def parse_endpoint(text: str) -> Endpoint:
    """`http://host:port`, `https://host:port` or `host:port` (http); ValueError naming what is wrong."""
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {text!r}: the scheme must be http or https")
    if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        raise ValueError(f"etcd endpoint {text!r}: only scheme, host and port are allowed")
    try:
        port = url.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"etcd endpoint {text!r}: the port must be in [1, 65535]") from None
    if not url.hostname:
        raise ValueError(f"etcd endpoint {text!r}: no host")
    return Endpoint(url.scheme == "https", url.hostname, port)


def _reason(exc: BaseException) -> str:
    """A short reason for a failed connect or read, for messages."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    inner = getattr(exc.__cause__, "exceptions", None)  # open_tcp_stream: every attempt's error
    if isinstance(exc, OSError) and not exc.strerror and inner:
        exc = inner[0]
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).lower().replace("_", " ")
        detail = getattr(exc, "verify_message", None)  # why a certificate was not trusted
        return f"tls: {reason}" + (f": {detail}" if detail else "")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return show(str(exc) or type(exc).__name__)


def _keep_alive(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):  # fmt: skip
        option = getattr(socket, name, None)  # not every platform has them
        if option is not None:
            stream.setsockopt(socket.IPPROTO_TCP, option, value)


@final
class HttpConnection:
    """An open connection: send a request, read its answer, maybe again (keep-alive)."""

    def __init__(self, endpoint: Endpoint, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
                 tcp: trio.SocketStream) -> None:  # fmt: skip
        self.endpoint = endpoint
        self._stream = stream
        self._tcp = tcp
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._eof = False

    @classmethod
    async def open(cls, endpoint: Endpoint, context: ssl.SSLContext | None, *, keep_alive: bool = False
                   ) -> HttpConnection:  # fmt: skip
        """Connect (and shake hands, for https); Unsent if that fails. The caller bounds the time."""
        try:
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except OSError as exc:
            raise Unsent(f"{endpoint}: {_reason(exc)}") from exc
        try:
            if keep_alive:
                _keep_alive(tcp)
            if not endpoint.tls:
                return cls(endpoint, tcp, tcp)
            assert context is not None, "an https endpoint always has a context"
            tls = trio.SSLStream(tcp, context, server_hostname=endpoint.host, https_compatible=True)
            await tls.do_handshake()
            return cls(endpoint, tls, tcp)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            await trio.aclose_forcefully(tcp)
            raise Unsent(f"{endpoint}: {_reason(exc)}") from exc
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise

    def fresh(self) -> bool:
        """Whether the connection can carry another request: both sides done, nothing unasked to read."""
        return self._h11.our_state is h11.IDLE and not self._tcp.socket.is_readable()

    def finish_cycle(self) -> bool:
        """After a whole answer: ready the connection for the next request; False if it cannot be reused."""
        if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        unasked, closed = self._h11.trailing_data
        if unasked or closed:  # bytes after the answer, read with it: the next answer would start with them
            return False
        self._h11.start_next_cycle()
        return True

    def close(self) -> None:
        """Close the socket now (a TLS connection without close_notify, as `aclose_forcefully` would).

        Synchronous on purpose: with no checkpoint, nothing (a cancellation above all) can stop a caller
        part-way, so a loop that closes several closes every one of them.
        """
        self._tcp.socket.close()

    async def send(self, call: Call, headers: list[tuple[str, str]]) -> None:
        head = [("Host", self.endpoint.authority), ("Content-Type", "application/json"),
                ("Content-Length", str(len(call.body))), *headers]  # fmt: skip
        request = h11.Request(method="POST", target=call.path, headers=head)
        data = self._h11.send(request) + self._h11.send(h11.Data(data=call.body))
        data += self._h11.send(h11.EndOfMessage())
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Broken(f"{call.what} on {self.endpoint}: sending: {_reason(exc)}") from exc

    async def receive_head(self, what: str) -> tuple[int, int | None]:
        """The answer's status and its Content-Length (None when chunked or until close)."""
        received = 0
        while True:
            event = self._next_event(what, "before an answer")
            if isinstance(event, h11.Response):
                return event.status_code, _content_length(event)
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like; `received` bounds how many
            if event is h11.NEED_DATA:
                received += await self._receive(what, received)
            else:
                raise Broken(f"{what} on {self.endpoint}: the connection closed before an answer")

    async def receive_body(self, what: str, limit: int, declared: int | None = None) -> bytes:
        """The whole body of the answer; EtcdBadResponse beyond `limit` bytes."""
        if declared is not None and declared > limit:
            raise EtcdBadResponse(f"{what} on {self.endpoint}: an answer of {declared} bytes (limit {limit})")
        body = bytearray()
        while (data := await self.receive_data(what)) is not None:
            body += data
            if len(body) > limit:
                raise EtcdBadResponse(f"{what} on {self.endpoint}: an answer over {limit} bytes")
        return bytes(body)

    async def receive_data(self, what: str) -> bytes | None:
        """The next piece of the body as it arrives; None at its end."""
        while True:
            event = self._next_event(what, "mid-answer")
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            if event is h11.NEED_DATA:
                await self._receive(what, 0)
            else:
                raise Broken(f"{what} on {self.endpoint}: the connection closed")

    def _next_event(self, what: str, closed: str) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            if self._eof:
                raise Broken(f"{what} on {self.endpoint}: the connection closed {closed}") from None
            raise EtcdBadResponse(f"{what} on {self.endpoint}: not HTTP/1.1: {show(str(exc))}") from None
        except ValueError as exc:  # h11 converts Content-Length with int(), which has a digit limit
            raise EtcdBadResponse(f"{what} on {self.endpoint}: not HTTP/1.1: {show(str(exc))}") from None

    async def _receive(self, what: str, received: int) -> int:
        """Read more from the socket into h11; the number of bytes read."""
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Broken(f"{what} on {self.endpoint}: {_reason(exc)}") from exc
        if received + len(data) > 4 * MAX_HEAD:
            raise EtcdBadResponse(f"{what} on {self.endpoint}: no answer head within {4 * MAX_HEAD} bytes")
        self._eof = not data
        self._h11.receive_data(bytes(data))
        return len(data)


def _content_length(response: h11.Response) -> int | None:
    for name, value in response.headers:
        if name == b"content-length":  # h11 has checked it is digits, and converted it already
            return int(value) if len(value) <= 18 else 10**18
    return None
