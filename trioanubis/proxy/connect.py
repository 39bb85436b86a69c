"""Socket-level connecting: a non-blocking TCP socket to one of a server's addresses.

Theory of operation: `connect_any` tries a server's resolved addresses in
order with a non-blocking `connect_ex` and waits for writability only on
EINPROGRESS. A client's connection passes its relay: the socket then waits
through the relay's readiness backend (and stays registered there for the
relay), and `relay.attempt_fd` names it while the Timer may cancel the wait.
Health checks pass none and wait through Trio (`open_server_socket`), so they
never depend on the data path's connection handling.

This is the socket boundary where `OSError` is translated, once, into
`ConnectFailed` (or `OutOfResources` when the shortage is ours) with a short
reason word (`reason_for`); nothing above it inspects errno values.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.errors import ConnectFailed, OutOfResources

if TYPE_CHECKING:
    from trioanubis.pool import Server
    from trioanubis.proxy.io import Readiness
    from trioanubis.relay import Relay


def close_socket(sock: socket.socket) -> None:
    """Close a socket, first waking any task that waits on it (Trio requires this)."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
    sock.close()


# Errors that mean this process ran short (descriptors, buffers), whoever it talks to.
LOCAL_SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# Linux creates sockets non-blocking in one call; elsewhere setblocking(False) follows.
_SOCK_NONBLOCK: Final[int] = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCKING_STREAM: Final = socket.SOCK_STREAM | _SOCK_NONBLOCK


def new_socket(family: int, address: object) -> socket.socket:
    """A non-blocking TCP socket; running out of descriptors is a ConnectFailed, not a crash."""
    try:
        # Created non-blocking: one system call instead of socket() + ioctl(FIONBIO).
        sock = socket.socket(family, _NONBLOCKING_STREAM)
    except OSError as exc:
        reason = reason_for(exc.errno or 0)
        message = f"connecting to {address}: cannot create a socket: {reason}"
        if exc.errno in LOCAL_SHORTAGE_ERRNOS:
            raise OutOfResources(message, reason) from exc
        raise ConnectFailed(message, reason) from exc
    if not _SOCK_NONBLOCK:
        sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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


async def connect_any(server: Server, relay: Relay | None = None) -> socket.socket:
    """Connect to the first of `server`'s addresses that accepts; ConnectFailed otherwise.

    A client's connection passes its `relay`: the socket joins the relay's
    poller before the wait and stays in it for the relay, so Trio's epoll never
    sees it, and `relay.attempt_fd` names it while the Timer may cancel the
    wait. Health checks pass none and wait through Trio.

    Not bounded in time: the caller is (a deadline, or the Timer).
    """
    poller = relay.poller if relay is not None else None
    last: ConnectFailed | None = None
    for family, sockaddr in server.sockaddrs:
        sock = new_socket(family, server.address)
        try:
            code = sock.connect_ex(sockaddr)
            if poller is not None and code in (0, errno.EINPROGRESS):
                poller.register(sock.fileno())
            if code == errno.EINPROGRESS:
                if relay is not None:
                    relay.attempt_fd = sock.fileno()
                    await relay.poller.wait_writable(relay.attempt_fd)
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


def _close_attempt(sock: socket.socket, poller: Readiness | None) -> None:
    if poller is not None:
        poller.close(sock)
    else:
        close_socket(sock)


def connect_timed_out(server: Server, timeout: float) -> ConnectFailed:
    return ConnectFailed(f"connecting to {server.address}: timeout after {timeout:g}s", "timeout")


async def open_server_socket(server: Server, timeout: float) -> socket.socket:
    """Connect to one of `server`'s addresses within `timeout` (health checks use this)."""
    with trio.move_on_after(timeout):
        return await connect_any(server)
    raise connect_timed_out(server, timeout)
