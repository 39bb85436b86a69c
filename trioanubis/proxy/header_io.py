"""The PROXY protocol on sockets: read a header from a trusted peer, send one to a server.

Theory of operation: `read_proxy_header` peeks at the client socket, feeds
what it sees to the sans-IO `HeaderReader` (proxy_protocol.py), and consumes
exactly the bytes the reader took, so nothing of the client's own stream is
read here: it stays in the kernel for the relay, in order. Every peek is
followed by consuming everything peeked until the header is complete, so a
wait for readability always waits for new bytes (never a busy loop on bytes
already seen). The whole read is bounded by `timeout` (`proxy_timeout`), a
header sent byte by byte included.

`send_proxy_header` writes our header to a freshly connected server before
the relay starts. The header (at most 107 bytes) fits in any empty send
buffer, so it goes in one `send`; a partial send waits through the relay's
poller for the rest.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.errors import ProxyHeaderError
from trioanubis.proxy.proxy_protocol import HeaderReader, HostPort, ProxyHeader, ProxyVersion, build_header

if TYPE_CHECKING:
    from trioanubis.proxy.relay import Relay

_sink = bytearray(4096)  # consumed header bytes land here; their content is already parsed
_SINK: Final = memoryview(_sink)


def _peek(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes without consuming them; None when there is nothing yet (EAGAIN)."""
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc)).lower()
        raise ProxyHeaderError(f"reading the PROXY header: {reason}", "proxy_header") from None


def _consume(sock: socket.socket, count: int) -> None:
    """Consume `count` bytes already peeked (they are in the kernel's buffer)."""
    while count:
        try:
            got = sock.recv_into(_SINK, min(count, len(_SINK)))
        except OSError:
            got = 0
        if not got:
            raise ProxyHeaderError("reading the PROXY header: the connection failed", "proxy_header")
        count -= got


async def read_proxy_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read one PROXY protocol header (v1 or v2) from non-blocking `sock`, within `timeout`.

    Consumes the header's bytes and nothing after them. Raises ProxyHeaderError
    (reason "proxy_header" or "proxy_timeout") for a bad, incomplete or late
    header; the caller closes the socket.
    """
    reader = HeaderReader()
    with trio.move_on_after(timeout):
        while True:
            data = _peek(sock, reader.room())
            if data is None:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                raise ProxyHeaderError("the peer closed before sending a whole PROXY header", "proxy_header")
            _consume(sock, reader.feed(data))
            if reader.header is not None:
                return reader.header
            if reader.failed:
                raise ProxyHeaderError(f"bad PROXY header: {reader.error}", "proxy_header")
    raise ProxyHeaderError(f"no whole PROXY header within proxy_timeout ({timeout:g}s)", "proxy_timeout")


def _local_address(client: socket.socket) -> HostPort | None:
    try:
        host, port = client.getsockname()[:2]
    except OSError:
        return None
    return str(host), int(port)


async def send_proxy_header(
    relay: Relay, version: ProxyVersion, client: tuple[object, ...], local: HostPort | None
) -> bool:
    """Send the header naming `client` → `local` (default: the address it connected to) to the server.

    False when the server failed meanwhile (the caller ends the connection).
    """
    if local is None:
        local = _local_address(relay.client)
    source = (str(client[0]), int(client[1]))  # type: ignore[call-overload]
    return await send_to_server(relay, build_header(version, source, local))


async def send_to_server(relay: Relay, data: bytes) -> bool:
    """Send `data` to the just-connected server before the relay starts; False if the server failed."""
    server = relay.server
    assert server is not None
    view = memoryview(data)
    while True:
        try:
            sent = server.send(view)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        view = view[sent:]
        if not view:
            return True
        relay.active = True  # the Timer's idle clock starts now, not at the epoch
        await relay.poller.wait_writable(server.fileno())
