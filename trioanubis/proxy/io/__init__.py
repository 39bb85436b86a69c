"""Readiness for relay sockets: one interface, two backends, chosen once at start.

Theory of operation: the relay and the connect path wait for their
non-blocking sockets through a `Readiness` backend instead of Trio directly,
so the fast path can be platform code behind an interface (as Trio keeps
epoll, kqueue and Windows behind one in `trio._core._io_*`):

- `epoll` (epoll.py, Linux): relay sockets join one edge-triggered epoll of
  the process once; one dispatcher task advances the relays inline, so a
  connection is one task parked once for both sockets, and bulk directions
  switch to splice(2). The product's fast path.
- `portable` (portable.py, everywhere Trio runs): every wait is Trio's own
  `trio.lowlevel.wait_readable` / `wait_writable` (epoll on Linux, kqueue
  on macOS and BSD, IOCP/AFD on Windows), level-triggered, a task per
  direction, and bytes are copied through the process with `recv_into` /
  `send`.

Both give the relay the same contract: wait only after a system call showed
the socket drained or full; `drive(relay)` runs a relay in the connection's
task until it ends, calling only the relay's `advance` (move a direction as
far as it goes without waiting, and say what it waits for) and waiting for
what it says, so the relay never learns which backend moved it; `interrupt`
raises a chosen error in a waiter; `forget`/`close` wake waiters with
`ClosedResourceError` before the socket goes; `pass_eof` says when a
server's first EOF is passed on to the client (epoll: after its next batch
of events, so that a client closing meanwhile saves the shutdown). Every relay behaviour above
this line (half-close, resets, backpressure, timeouts, failover, drain) is
therefore the relay's own code on either backend.

Nothing here, nor in either backend, touches a Linux-only name at import
time: the choice is made by `open_readiness` when the balancer is built.
`"auto"` takes epoll where `select.epoll` exists; the `ANUBIS_IO` environment
variable, when set, replaces `"auto"` (the test suite runs twice this way).
"""

from __future__ import annotations

import os
from typing import Final, Literal

from trioanubis.config import IO_CHOICES, IoName, epoll_available
from trioanubis.errors import AnubisError
from trioanubis.proxy.io.base import AGAIN, OVER, READ, WRITE, Capabilities, Driven, Readiness

__all__ = ["AGAIN", "IO_CHOICES", "IO_ENV", "OVER", "READ", "WRITE", "Capabilities", "Driven", "IoName",
           "Readiness", "epoll_available", "open_readiness", "resolve_io"]  # fmt: skip

# Replaces "auto" when set (tests, and a quick switch without editing the config).
IO_ENV: Final = "ANUBIS_IO"


def resolve_io(wanted: str) -> Literal["epoll", "portable"]:
    """The backend `wanted` ("auto", "epoll" or "portable") means on this machine.

    "epoll" where it does not exist is an error naming what was asked for.
    """
    if wanted == "auto":
        wanted = os.environ.get(IO_ENV, "") or "auto"
        if wanted not in IO_CHOICES:
            raise AnubisError(f"{IO_ENV}={wanted!r}: must be one of {', '.join(map(repr, IO_CHOICES))}")
    if wanted == "auto":
        return "epoll" if epoll_available() else "portable"
    if wanted == "epoll":
        if not epoll_available():
            raise AnubisError("io = 'epoll': this platform has no epoll (use 'auto' or 'portable')")
        return "epoll"
    return "portable"


def open_readiness(wanted: str) -> Readiness:
    """Build the backend `wanted` resolves to; its module is imported only now."""
    if resolve_io(wanted) == "epoll":
        from trioanubis.proxy.io.epoll import Poller

        return Poller()
    from trioanubis.proxy.io.portable import PortableReadiness

    return PortableReadiness()
