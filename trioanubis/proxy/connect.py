"""Socket-level connecting: a non-blocking TCP socket to one of a server's addresses.

Theory of operation: `connect_any` tries a server's resolved addresses in
order with a non-blocking connect and waits for writability only on
EINPROGRESS. A client's connection passes its `Connecting` state: the
socket then waits through the connection's readiness backend (and stays
registered there for the relay), and `Connecting.fd` names it while the
Timer may cancel the wait (`Connecting.cancel`, which wakes it through the
backend: cheaper than a cancel scope per attempt).
Health checks pass none and wait through Trio (`open_server_socket`), so they
never depend on the data path's connection handling.

This is the socket boundary where `OSError` is translated, once, into
`ConnectFailed` (or `OutOfResources` when the shortage is ours) with a short
reason word (`reason_for`); nothing above it inspects errno values.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import math
import socket
import sys
from typing import TYPE_CHECKING, Final, Literal, final

import trio

from trioanubis.errors import AttemptCancelled, ConnectFailed, OutOfResources
from trioanubis.proxy.io.sockcalls import connect_inet, connect_tcp

if TYPE_CHECKING:
    from trioanubis.pool import Server
    from trioanubis.proxy.io.base import Readiness


# Why the Timer cancelled a connect attempt ("" while it has not).
AttemptEnd = Literal["", "timeout", "client_abort"]


def close_socket(sock: _socket.socket) -> None:
    """Close a socket, first waking any task that waits on it (Trio requires this)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
    sock.close()


# Errors that mean this process ran short (descriptors, buffers), whoever it talks to.
LOCAL_SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# Linux creates sockets non-blocking in one call; elsewhere setblocking(False) follows.
_SOCK_NONBLOCK: Final[int] = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | _SOCK_NONBLOCK


# Linux's TCP_QUICKACK (0 where there is none: no TCP option has that number).
_TCP_QUICKACK: Final[int] = getattr(socket, "TCP_QUICKACK", 0)
# Read once: in the compiled build a module-level Final is a native load, `socket.X` a lookup by name.
_AF_INET: Final[int] = socket.AF_INET
_connect_inet: Final = connect_inet
_connect_tcp: Final = connect_tcp
_EINPROGRESS: Final[int] = errno.EINPROGRESS


def new_socket(family: int, address: object) -> _socket.socket:
    """A non-blocking TCP socket; running out of descriptors is a ConnectFailed, not a crash."""
    try:
        # Created non-blocking: one system call instead of socket() + ioctl(FIONBIO).
        sock = _socket.socket(family, _NONBLOCKING_STREAM)  # the C type: see `as_stdlib`
    except OSError as exc:
        reason = reason_for(exc.errno or 0)
        message = f"connecting to {address}: cannot create a socket: {reason}"
        if exc.errno in LOCAL_SHORTAGE_ERRNOS:
            raise OutOfResources(message, reason) from exc
        raise ConnectFailed(message, reason) from exc
    if not _SOCK_NONBLOCK:
        sock.setblocking(False)
    return sock


def as_stdlib(sock: _socket.socket) -> socket.socket:
    """`sock` as the stdlib's `socket.socket`, the only type Trio's sockets take: itself when it is one,
    else a new one owning its descriptor (`sock` is left detached, closing it closes nothing).

    The data path's sockets are the C type the stdlib class derives from
    (`_socket.socket`): made without that class's Python `__init__` and closed
    without its Python `close` (0.5 and 0.2 µs a socket, two sockets a
    connection); only a connection that goes to Trio's streams (TLS, filters)
    pays for the stdlib object, once per socket.
    """
    if isinstance(sock, socket.socket):
        return sock
    return socket.socket(sock.family, sock.type, sock.proto, sock.detach())


def send_delayed_ack(sock: _socket.socket) -> None:
    """Send the handshake's last ACK now, if `delay_ack` kept it for bytes that may be slow to come.

    Linux sends a pending ACK when TCP_QUICKACK is turned on; else the
    server would accept only at the delayed-ACK limit (200 ms).
    """
    if _TCP_QUICKACK:
        with contextlib.suppress(OSError):  # a socket the server reset meanwhile: the relay will see
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def reason_for(code: int) -> str:
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


@final
class Connecting:
    """A client connection's state while it connects: what the Timer checks, and how it stops an attempt.

    One per connection from its accept until it has a server (and while it is
    held in a pool's line); the relay points at it meanwhile and drops it once
    connected, so a relaying connection carries none of it.
    """

    __slots__ = ("deadline", "end", "fd", "poller", "started")

    def __init__(self, poller: Readiness) -> None:
        self.poller = poller
        self.started = 0.0  # when this round of attempts began
        self.deadline = math.inf  # the attempt's: connect_timeout, capped by failover_timeout
        self.fd = -1  # the socket an attempt waits on, while it waits
        self.end: AttemptEnd = ""  # "timeout" or "client_abort" once the Timer cancelled an attempt

    def cancel(self, why: AttemptEnd) -> None:
        """Called by the Timer: stop the attempt under way (it raises AttemptCancelled).

        The attempt is woken through the poller it waits in; an attempt that is
        not waiting (it has just finished, or none is under way) is left alone.
        """
        if self.fd >= 0 and not self.end and self.poller.interrupt(self.fd, AttemptCancelled):
            self.end = why


async def connect_any(server: Server, connecting: Connecting | None = None, *, delay_ack: bool = False
                      ) -> _socket.socket:
    """Connect to the first of `server`'s addresses that accepts; ConnectFailed otherwise.

    A client's connection passes its `connecting` state: the socket joins that
    poller before the wait and stays in it for the relay, so Trio's epoll never
    sees it, and `connecting.fd` names it while the Timer may cancel the
    wait. Health checks pass none and wait through Trio.

    The socket's options and its connect are one call (proxy/io/sockcalls.py:
    the C helper's `connect_inet` for IPv4 where it was built). `delay_ack`
    when the caller sends as soon as it is connected: bytes go to the server
    at once, so the handshake's last ACK may wait for them (HAProxy's
    `tcp-smart-connect`; see connection.py's `read_early`). For a client's
    connection a loopback connect that finished inside connect() is not
    waited for: over loopback the kernel runs the whole handshake within the
    call when the server's accept queue has room, and one `getpeername` then
    saves the task a park and a wake-up (about 4 µs of CPU per connection,
    4.6 %, in an A/B of the connection-rate workload). A connect to another
    host never finishes that fast, so it is not asked.

    Not bounded in time: the caller is (a deadline, or the Timer).
    """
    poller = connecting.poller if connecting is not None else None
    last: ConnectFailed | None = None
    for family, sockaddr in server.sockaddrs:
        sock = new_socket(family, server.address)
        try:
            fd = sock.fileno()
            connect = _connect_inet if family == _AF_INET else _connect_tcp
            code = connect(sock, fd, sockaddr, delay_ack, connecting is not None)
            if poller is not None and code in (0, _EINPROGRESS):  # writable: to wait for the connect
                poller.register(fd, writable=code != 0)
            if code == _EINPROGRESS:
                if connecting is not None:
                    connecting.fd = fd
                    try:
                        await connecting.poller.wait_writable(fd)
                    finally:
                        connecting.fd = -1
                    code = _connect_result(sock, fd, connecting.poller)
                else:
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                return sock
        except BaseException:
            _close_attempt(sock, poller)
            raise
        _close_attempt(sock, poller)
        reason = reason_for(code)
        last = ConnectFailed(f"connecting to {server.address}: {reason}", reason)
    raise last or ConnectFailed(f"connecting to {server.address}: no address resolved", "unresolved")


def _connect_result(sock: _socket.socket, fd: int, poller: Readiness) -> int:
    """How a connect that woke writable ended: 0, or the errno SO_ERROR holds.

    Where the poller reports errors and hang-ups (epoll), a socket that woke
    without one is connected, and the system call is saved (one per connection).
    """
    if poller.caps.reports_errors and fd not in poller.hung_up:
        return 0
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _close_attempt(sock: _socket.socket, poller: Readiness | None) -> None:
    if poller is not None:
        poller.close(sock)
    else:
        close_socket(sock)


def connect_timed_out(server: Server, timeout: float) -> ConnectFailed:
    return ConnectFailed(f"connecting to {server.address}: timeout after {timeout:g}s", "timeout")


async def open_server_socket(server: Server, timeout: float) -> socket.socket:
    """Connect to one of `server`'s addresses within `timeout` (health checks use this), as the stdlib
    socket Trio's streams take."""
    with trio.move_on_after(timeout):
        sock = await connect_any(server)
        try:
            return as_stdlib(sock)
        except BaseException:
            _socket.socket.close(sock)
            raise
    raise connect_timed_out(server, timeout)


# The client socket is non-blocking already; MSG_DONTWAIT (not on Windows) only makes sure.
_PEEK: Final = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
# Linux's TCP_INFO starts with the connection's state; CLOSE_WAIT means the peer sent FIN.
# (Not `Final`: mypyc compiles a final `int | None` into C that does not build, setup.py.)
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCP_CLOSE_WAIT: Final = 8


def client_gone(client: _socket.socket, *, fin_after_data: bool = False, read_early: bool = False) -> bool:
    """True when the client has closed or reset (peeking consumes none of its bytes).

    A client that sent its request and then closed looks, from here, exactly
    like one that only shut down its sending side and waits for an answer:
    both sent bytes and a FIN. With `fin_after_data` such a client is taken
    for gone too (HAProxy's `abortonclose`: what a held client asks for by
    default, so that a client that gave up loses its place and its request is
    never sent on); the FIN behind unread bytes is seen where the kernel says
    so (Linux's TCP_INFO), elsewhere only a FIN with nothing before it is.
    `read_early`: the connection holds bytes of the client's already
    (connection.py's `read_early`), so a FIN found first is a FIN after data.
    """
    try:
        if client.recv(1, _PEEK) == b"":
            return fin_after_data or not read_early
    except BlockingIOError:
        return False
    except OSError:
        return True
    return fin_after_data and _fin_received(client)


def _fin_received(sock: _socket.socket) -> bool:
    if _TCP_INFO is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:
        return False
    return info[0] == _TCP_CLOSE_WAIT


async def send_first(sock: _socket.socket, data: bytes, connecting: Connecting) -> None:
    """Send `data` on a just-connected server socket before the relay starts (a PROXY header, a prefix).

    Waits through the connection's poller, where the Timer can end the wait
    (the attempt's deadline, or the client leaving), as it ends a connect.
    `OSError` from the server becomes `ConnectFailed`: the attempt failed
    before a byte of the client's reached a server, so it may fail over.
    """
    view = memoryview(data)
    fd = sock.fileno()
    while True:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            reason = reason_for(exc.errno or 0)
            raise ConnectFailed(f"sending to {sock_peer(sock)}: {reason}", reason) from None
        view = view[sent:]
        if not view:
            return
        connecting.fd = fd
        try:
            await connecting.poller.wait_writable(fd)
        finally:
            connecting.fd = -1


def sock_peer(sock: _socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "the server"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
