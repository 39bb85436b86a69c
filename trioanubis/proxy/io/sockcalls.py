"""The data path's socket calls: the C helper where it was built, the socket methods elsewhere.

Theory of operation: a relay step reads a chunk from one socket and sends it
to the other, on non-blocking sockets that readiness said were ready. The
socket module's methods drop and take the GIL around each system call,
parse their arguments with a format string, and raise BlockingIOError for
EAGAIN; `_sockcalls.c`, built with the compiled modules (setup.py), keeps
the GIL, takes its arguments as a vector and returns EAGAIN as a number.
Both take the socket object and its descriptor (each uses one) and answer
alike:

- `recv_into(sock, fd, buffer)`: the bytes read into `buffer`, 0 at EOF, -1
  when there are none yet (EAGAIN);
- `send(sock, fd, buffer, count)`: how many of `buffer[:count]` the socket
  took, 0 when it took none (EAGAIN).

Any other error raises the OSError subclass the socket module raises
(ConnectionResetError, BrokenPipeError, ...). `BUILT` says which is in use.

`connect_inet(sock, fd, sockaddr, delay_ack, at_once)` sets a new server
socket's options (TCP_NODELAY; TCP_QUICKACK off with `delay_ack`) and
connects it, answering as `connect_ex` does (0, EINPROGRESS, or the error's
number); with `at_once`, a loopback connect the kernel finished inside the
call answers 0 (connect.py). The C helper's takes IPv4 addresses only, in
the dotted form the resolver gives (another raises ValueError); `connect_tcp`,
the socket methods, takes any family.

`epoll_ctl(epfd, op, fd, events)` (Linux, with the helper; None elsewhere)
is the system call for the epoll backend's register (EPOLL_CTL_ADD) and
modify (EPOLL_CTL_MOD), the event's data being `fd` as `select.epoll` gives it.

`epoll_ready(epfd, maxevents)` (Linux, with the helper; None elsewhere) takes
the epoll's ready list without waiting, one int per descriptor: `fd << 3`
with bit 1 for readable (EPOLLIN, EPOLLRDHUP, EPOLLHUP, EPOLLERR), 2 for
writable (EPOLLOUT, EPOLLHUP, EPOLLERR) and 4 for hung up (EPOLLRDHUP,
EPOLLHUP, EPOLLERR). Where it is missing, the epoll backend packs
`select.epoll.poll`'s pairs the same way (epoll.py's `ready_from`).

`accept_inet(fd)` (Linux, with the helper; None elsewhere) accepts on an IPv4
listening socket with `accept4(SOCK_NONBLOCK)`: `(client_fd, (host, port))`,
the client's socket non-blocking already, or None when no client is waiting
(EAGAIN: an answer at the end of every accept batch, not an exception; listener.py).

`listen_backlog(sock, fd)` (Linux; None elsewhere) is how many clients wait in
a TCP listening socket's accept queue (TCP_INFO's tcpi_unacked), -1 for any
other socket: the listener counts before it accepts, since an accept into an
empty queue costs the kernel a socket file made and freed (listener.py).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import socket
import sys
from collections.abc import Callable
from typing import Final

# Linux's TCP_QUICKACK (0 where there is none: no TCP option has that number).
_TCP_QUICKACK: Final[int] = getattr(socket, "TCP_QUICKACK", 0)

__all__ = ["BUILT", "READY_HUNG_UP", "READY_READ", "READY_SHIFT", "READY_WRITE", "accept_inet",
           "connect_inet", "connect_tcp", "epoll_ctl", "epoll_ready", "listen_backlog", "recv_into", "send"]

# What `epoll_ready` packs beside a descriptor (_sockcalls.c's values).
READY_READ: Final = 1
READY_WRITE: Final = 2
READY_HUNG_UP: Final = 4
READY_SHIFT: Final = 3


def _recv_into(sock: _socket.socket, fd: int, buffer: memoryview) -> int:
    try:
        return sock.recv_into(buffer)
    except BlockingIOError:
        return -1


def _send(sock: _socket.socket, fd: int, buffer: memoryview, count: int) -> int:
    try:
        return sock.send(buffer[:count])
    except BlockingIOError:
        return 0


def connect_tcp(sock: _socket.socket, fd: int, sockaddr: tuple[object, ...], delay_ack: bool, at_once: bool
                ) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if delay_ack and _TCP_QUICKACK:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 0)
    code = sock.connect_ex(sockaddr)
    if code == errno.EINPROGRESS and at_once and _loopback(sockaddr[0]):
        try:
            sock.getpeername()
        except OSError:  # not yet (ENOTCONN), or refused already: the wait tells which
            return code
        return 0
    return code


# Linux's TCP_INFO, and where `struct tcp_info` keeps the state (a byte) and tcpi_unacked (a u32).
_TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", 0)
_TCP_LISTEN: Final = 10
_UNACKED_AT: Final = 24


def _listen_backlog(sock: _socket.socket, fd: int) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return -1
    if len(info) < _UNACKED_AT + 4 or info[0] != _TCP_LISTEN:
        return -1
    return int.from_bytes(info[_UNACKED_AT:_UNACKED_AT + 4], sys.byteorder)


def _loopback(host: object) -> bool:
    return isinstance(host, str) and (host.startswith("127.") or host == "::1")


recv_into: Callable[[_socket.socket, int, memoryview], int] = _recv_into
send: Callable[[_socket.socket, int, memoryview, int], int] = _send
connect_inet: Callable[[_socket.socket, int, tuple[object, ...], bool, bool], int] = connect_tcp
# Not built here (an editable install, no compiler, Windows): the socket methods.
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import connect_inet, recv_into, send
BUILT: Final = recv_into is not _recv_into
accept_inet: Callable[[int], tuple[int, tuple[str, int]] | None] | None = None
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import accept_inet
# Linux (TCP_INFO): the helper's, else the socket's getsockopt; None elsewhere.
listen_backlog: Callable[[_socket.socket, int], int] | None = (
    _listen_backlog if sys.platform.startswith("linux") and _TCP_INFO else None)
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import listen_backlog
epoll_ctl: Callable[[int, int, int, int], None] | None = None
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import epoll_ctl
epoll_ready: Callable[[int, int], list[int]] | None = None
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import epoll_ready
