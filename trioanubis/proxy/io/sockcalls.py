"""The relay's `recv_into` and `send`: the C helper where it was built, the socket methods elsewhere.

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

`accept_inet(fd)` (Linux, with the helper; None elsewhere) accepts on an IPv4
listening socket with `accept4(SOCK_NONBLOCK)`: `(client_fd, (host, port))`,
the client's socket non-blocking already (listener.py).
"""

from __future__ import annotations

import _socket
import contextlib
from collections.abc import Callable
from typing import Final

__all__ = ["BUILT", "accept_inet", "recv_into", "send"]


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


recv_into: Callable[[_socket.socket, int, memoryview], int] = _recv_into
send: Callable[[_socket.socket, int, memoryview, int], int] = _send
# Not built here (an editable install, no compiler, Windows): the socket methods.
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import recv_into, send
BUILT: Final = recv_into is not _recv_into
accept_inet: Callable[[int], tuple[int, tuple[str, int]]] | None = None
with contextlib.suppress(ImportError):
    from trioanubis.proxy.io._sockcalls import accept_inet
