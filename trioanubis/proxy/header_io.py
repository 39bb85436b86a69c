"""The PROXY protocol on sockets: the opening stage of an `accept_proxy` listener.

Theory of operation: `read_header` is the first stage of a connection to a
listener with `accept_proxy` (connection.py): it reads the header within
`proxy_timeout`, takes the client it names as the connection's client (an
IPv4-mapped address as IPv4), and asks the listener's admission about that
client (allow/deny, the per-client limits), whose slot the connection then
holds. A bad, late or missing header, or a refused client, ends the
connection here (`proxy_header`, `proxy_timeout`, `refused`), counted by
the admission. (Our own header for servers is sent by failover.py.)

`read_proxy_header` peeks at the client socket, feeds
what it sees to the sans-IO `HeaderReader` (proxy_protocol.py), and consumes
exactly the bytes the reader took, so nothing of the client's own stream is
read here: it stays in the kernel for the relay, in order. Every peek is
followed by consuming everything peeked until the header is complete, so a
wait for readability always waits for new bytes (never a busy loop on bytes
already seen). The whole read is bounded by `timeout` (`proxy_timeout`), a
header sent byte by byte included.
"""

from __future__ import annotations

import _socket
import errno
import socket
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.errors import ProxyHeaderError
from trioanubis.proxy.lifecycle import normalise_peer
from trioanubis.proxy.proxy_protocol import HeaderReader, ProxyHeader

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection



# A sink for callers without a scratch buffer of their own (tests): a header is at most 232 bytes.
_SINK_SIZE: Final = 4096


def _peek(sock: _socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes without consuming them; None when there is nothing yet (EAGAIN)."""
    try:
        return sock.recv(size, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc)).lower()
        raise ProxyHeaderError(f"reading the PROXY header: {reason}", "proxy_header") from None


def _consume(sock: _socket.socket, count: int, sink: memoryview) -> None:
    """Consume `count` bytes already peeked (they are in the kernel's buffer) into `sink`, whose content
    nobody reads (the bytes are parsed already)."""
    while count:
        try:
            got = sock.recv_into(sink, min(count, len(sink)))
        except OSError:
            got = 0
        if not got:
            raise ProxyHeaderError("reading the PROXY header: the connection failed", "proxy_header")
        count -= got


async def read_proxy_header(
    sock: _socket.socket, timeout: float, sink: memoryview | None = None
) -> ProxyHeader:
    """Read one PROXY protocol header (v1 or v2) from non-blocking `sock`, within `timeout`.

    Consumes the header's bytes and nothing after them, reading them into
    `sink` (the balancer's scratch buffer: nothing module-wide, so two
    balancers in two threads share no buffer; a buffer of its own if None). Raises ProxyHeaderError
    (reason "proxy_header" or "proxy_timeout") for a bad, incomplete or late
    header; the caller closes the socket.
    """
    reader = HeaderReader()
    sink = memoryview(bytearray(_SINK_SIZE)) if sink is None else sink
    with trio.move_on_after(timeout):
        while True:
            data = _peek(sock, reader.room())
            if data is None:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                raise ProxyHeaderError("the peer closed before sending a whole PROXY header", "proxy_header")
            _consume(sock, reader.feed(data), sink)
            if reader.header is not None:
                return reader.header
            if reader.failed:
                raise ProxyHeaderError(f"bad PROXY header: {reader.error}", "proxy_header")
    raise ProxyHeaderError(f"no whole PROXY header within proxy_timeout ({timeout:g}s)", "proxy_timeout")


async def read_header(conn: Connection) -> bool:
    """The opening stage of an `accept_proxy` listener (see the module docstring); False when it ended."""
    origin = conn.origin
    admission = origin.admission
    now = origin.poller.now
    conn.waited_by_trio()  # the header is read with Trio's own waits
    try:
        header = await read_proxy_header(conn.client_sock, admission.proxy_timeout, origin.poller.scratch)
    except ProxyHeaderError as exc:
        admission.refuse(str(conn.peer[0]), exc.reason, now(), str(exc))
        conn.end_with("proxy_timeout" if exc.reason == "proxy_timeout" else "proxy_header")
        return False
    if header.source is not None:  # not LOCAL / UNKNOWN, where the proxy speaks for itself
        conn.peer = normalise_peer(header.source)
        if header.destination is not None:
            host, port = normalise_peer(header.destination)
            conn.more.local = (str(host), int(port))  # type: ignore[call-overload]
    counted = admission.admit(str(conn.peer[0]), now())
    if counted is None:
        conn.end_with("refused")
        return False
    if counted:
        conn.admitted(counted)
    return True
