"""Listeners: bind a socket, accept connections, start one task per connection.

Theory of operation: `Listener.bind` opens the listening socket (the balancer
binds every listener before its pools and replicas start, so no replica is
given a listener's port); `Listener.serve` binds it if `bind` did not, reports
the bound address through `task_status.started`, then accepts until cancelled. Each
accepted client becomes a `Connection` (lifecycle.py), the one owner of its
life, and runs in one of the listener's connection tasks (its `Crew`,
connection.py: an idle one, or a new one) in a *separate* nursery that the
caller owns, so closing a listener (drain, reload) stops new connections
without touching the open ones. The listen socket is closed
in `finally` the moment its accept loop is cancelled.

Accepting drains the backlog (several connections per wake-up) and waits for
readiness only when it is empty. Each accept is the socket's `Acceptor`'s
(`next`: accept one, admit it, make its `Connection`), which the crew's
tasks call too: a task that has just ended its connection takes a client
that is waiting (`take`) instead of parking until the accept loop hands it
one, a wake-up less. Errors that mean "out of resources" (EMFILE,
ENFILE, ENOBUFS, ENOMEM) go to an `AcceptBackoff`: logged once per episode,
without a traceback, and retried after a short sleep, like Trio's
`serve_listeners`; any other error propagates. The admin endpoint's accept
loop uses the same `AcceptBackoff`.

Limits: a listener's `max_connections` and the process-wide `Limits` are
checked right after accept; a client over either limit is closed at once and
counted in `rejected`. A listener that screens its clients at accept
(allow/deny, per-client limits, without the PROXY protocol) asks its
`Admission` next: a refused client is closed before it gets a task, an
admitted one's per-client slot is its connection's to give back.

What a connection does before connecting is the listener's `opening`, a
tuple of stages chosen from its config (and again at a reload): the PROXY
header with the admission of the client it names (header_io.py), then the
TLS opening for `routes` or `tls` (tls_opening.py). A plain listener has
none, and its accept path is unchanged.

A listener does not know the access log: each ended connection hands itself
to `on_record` (app.py wires the access log in).
"""

from __future__ import annotations

import _socket
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, final

import trio

from trioanubis.config import Address, ListenerConfig
from trioanubis.errors import AnubisError
from trioanubis.pool import Pool
from trioanubis.proxy.admission import Admission
from trioanubis.proxy.connect import LOCAL_SHORTAGE_ERRNOS, close_socket
from trioanubis.proxy.connection import Crew, Stage
from trioanubis.proxy.header_io import read_header
from trioanubis.proxy.io import Readiness, sockcalls
from trioanubis.proxy.io.readable import ReadableWait
from trioanubis.proxy.lifecycle import Connection, Limits, Origin, normalise_peer
from trioanubis.proxy.record import RecordSink
from trioanubis.proxy.sni_routes import RouteTable
from trioanubis.proxy.timeouts import Timer
from trioanubis.proxy.tls_opening import COUNTS, open_tls

log = logging.getLogger("trioanubis.listener")

ACCEPT_OVERLOAD_ERRNOS: Final = LOCAL_SHORTAGE_ERRNOS
# How long to back off when the process is out of file descriptors: the
# same 100 ms as Trio's serve_listeners; long enough not to spin, short
# enough that a freed descriptor is used soon.
ACCEPT_BACKOFF: Final = 0.1
# Accepts in a row before yielding to the connections already running.
ACCEPTS_PER_CHECKPOINT: Final = 64
# Linux copies the listening socket's TCP_NODELAY into each socket accept() returns
# (the accepted socket is cloned from it); elsewhere each accepted socket is set itself.
NODELAY_INHERITED: Final = sys.platform.startswith("linux")
_SOCK_NONBLOCK: Final[int] = getattr(socket, "SOCK_NONBLOCK", 0)

# How a listener gets its listening socket: bind address and backlog in, a
# non-blocking listening socket out (workers share one bound by the supervisor).
SocketOpener = Callable[[Address, int], Awaitable[socket.socket]]



@final
class AcceptBackoff:
    """What an accept loop does when the process runs short: count, log once per episode, sleep."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self.overloads = 0
        self.overloaded = False  # inside an episode: logged already

    async def back_off(self, exc: OSError) -> None:
        """Sleep `ACCEPT_BACKOFF` if `exc` is a local shortage; re-raise any other error."""
        if exc.errno not in ACCEPT_OVERLOAD_ERRNOS:
            raise exc
        self.overloads += 1
        if not self.overloaded:
            self.overloaded = True
            self.log.error("%s: accept failed: %s; backing off %gs and retrying",
                           self.what, exc.strerror, ACCEPT_BACKOFF)  # fmt: skip
        await trio.sleep(ACCEPT_BACKOFF)

    def recovered(self) -> None:
        """An accept succeeded: end the episode (callers test `overloaded` first, it is cheaper)."""
        self.overloaded = False
        self.log.info("%s: accepting again", self.what)


@final
class Acceptor:
    """One listening socket's accept, a client at a time, admitted: what the listener's accept loop
    calls, and what a connection task that has just ended its connection calls (`take`) to go on
    with a client that is waiting instead of parking (connection.py).

    Where the kernel says how many clients wait (Linux: `sockcalls.listen_backlog`),
    an accept is made only for a counted one. An accept into an empty queue is
    the dearest call a listener makes (the kernel makes the new socket's file
    before it looks at the queue, and frees it: 3.8 µs of system time here),
    and the accept loop used to end every wake-up with one; a count is 0.5 µs.
    A count is a moment's: others accept from the same socket (the crew's
    tasks; a sibling worker or an upgraded process sharing it), so an accept
    that finds none ends the count. A task counts again only after the
    dispatcher has looked at its ready list since the last count (`looks`):
    at most once per batch of events, not once per connection that ends.
    The tasks take at most `allowance` clients between two steps of the
    accept loop (which resets it to ACCEPTS_PER_CHECKPOINT), so a burst of
    clients whose connections end at once (no server, a reset) is not served
    in one turn of Trio's loop. A kernel whose count is wrong (a client
    accepted where it counted none, three times) is no longer asked.

    What each accept costs is kept small: the socket object is made from the
    accepted descriptor with the listener's family and type as plain numbers
    (the stdlib's `accept` converts both to enums per call), with the C
    helper's `accept4` on Linux and IPv4 the client's socket is non-blocking
    from the start (its type says so: no system call), and where the kernel
    copies the listening socket's TCP_NODELAY into the sockets it accepts
    (Linux), it is set once on the listening socket.
    """

    __slots__ = ("accept", "accept_inet", "allowance", "backlog", "family", "kind", "listen_fd",
                 "listen_sock", "listener", "looked", "miscounts", "nodelay", "poller", "proto",
                 "waiting")  # fmt: skip

    def __init__(self, listener: Listener, sock: socket.socket) -> None:
        self.listener = listener
        self.poller = listener.poller
        self.nodelay = not (NODELAY_INHERITED and set_nodelay(sock))  # per connection, unless inherited
        # The stdlib's accept() without its enum conversions: the descriptor, then the socket object.
        self.accept: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self.family, self.kind, self.proto = int(sock.family), int(sock.type), sock.proto
        inet = self.family == socket.AF_INET and not sock.getblocking()
        self.accept_inet = sockcalls.accept_inet if inet else None
        if self.accept_inet is not None:
            self.kind |= _SOCK_NONBLOCK
        self.listen_sock = sock
        self.listen_fd = sock.fileno()
        backlog = sockcalls.listen_backlog  # it answers -1 for a socket it cannot count
        self.backlog = backlog if backlog is not None and backlog(sock, self.listen_fd) >= 0 else None
        self.waiting = 0  # clients counted and not accepted since
        self.looked = -1  # the poller's `looks` at the last count
        self.allowance = ACCEPTS_PER_CHECKPOINT  # takes left to the tasks until the loop's next step
        self.miscounts = 0  # clients accepted where the kernel counted none

    def count(self) -> int:
        """Count the clients waiting now (`backlog` is set)."""
        assert self.backlog is not None
        self.looked = self.poller.looks
        self.waiting = max(self.backlog(self.listen_sock, self.listen_fd), 0)
        return self.waiting

    def next(self, *, doubt: bool = False) -> Connection | None:
        """The next waiting client that the listener admits, as its `Connection` (which holds its
        counts from now); None when none is waiting. `doubt`: the first accept is made even if the
        count says none. Raises the accept's OSError."""
        listener = self.listener
        addr: tuple[Any, ...]
        while True:
            miscounted = False
            if self.backlog is not None:
                if self.waiting == 0 and self.count() == 0:
                    if not doubt:
                        return None
                    miscounted = True
                else:
                    self.waiting -= 1
            doubt = False
            if self.accept_inet is not None:
                accepted = self.accept_inet(self.listen_fd)
                if accepted is None:  # another took it: the count is over
                    self.waiting = 0
                    return None
                fd, addr = accepted
            else:
                try:
                    fd, addr = self.accept()
                except BlockingIOError:
                    self.waiting = 0
                    return None
            if miscounted:
                self._miscounted()
            # The C type: see connect.py's `as_stdlib`.
            client = _socket.socket(self.family, self.kind, self.proto, fd)
            if listener.backoff.overloaded:
                listener.backoff.recovered()
            listener.accepted += 1
            if listener.over_limit():
                listener.rejected += 1
                client.close()
                continue
            if ":" in addr[0]:  # IPv6, or IPv4 on a dual-stack listener: written as IPv4 when it is
                addr = normalise_peer(addr)
            counted: str | None = ""
            if listener.screening:
                counted = listener.admission.at_accept(str(addr[0]), listener.poller.now())
                if counted is None:
                    client.close()
                    continue
            if self.accept_inet is None:
                client.setblocking(False)
            if self.nodelay:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Connection(listener, client, addr, listener.pool, counted or None)

    def _miscounted(self) -> None:
        """A client was accepted where the kernel counted none: a count can miss one that arrived
        between the count and the accept, but not three times; then stop asking."""
        self.miscounts += 1
        if self.miscounts >= 3:
            self.backlog = None
            self.waiting = 0
            log.warning("listener %s: the kernel's count of waiting clients is wrong here; accepting "
                        "until none is left instead", self.listener.name)  # fmt: skip

    def take(self) -> Connection | None:
        """A waiting client for a connection task between two connections, or None: only a counted
        one (where nothing counts, none), a count made at most once per look of the dispatcher, and
        at most `allowance` between two steps of the accept loop. A shortage (EMFILE and the like)
        is left to the accept loop to back off from."""
        if self.backlog is None or self.allowance <= 0:
            return None
        if self.waiting == 0 and (self.looked == self.poller.looks or self.count() == 0):
            return None
        self.allowance -= 1
        try:
            return self.next()
        except OSError:
            return None


def somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


@final
class Listener(Origin):
    """One bound socket and its counters (what its connections need of it: `Origin`)."""

    def __init__(
        self,
        config: ListenerConfig,
        pools: Mapping[str, Pool],
        limits: Limits,
        on_record: RecordSink,
        timer: Timer,
        poller: Readiness,
        open_socket: SocketOpener | None = None,
    ) -> None:
        self.config = config
        self.open_socket: SocketOpener = open_socket or open_listen_socket
        self.name = config.name
        self.pools = pools  # the balancer's, live: routes name them
        self.pool: Pool | None = pools.get(config.pool)  # None only with routes and no fallback
        self.routes = RouteTable(config.routes)
        self.tls_counts = dict.fromkeys(COUNTS, 0)
        self.admission = Admission(config.name, config)
        self.screening = config.screens_clients  # judged at accept (with accept_proxy: only the proxy)
        self.opening = _opening_for(config)
        self.limits = limits
        self.on_record = on_record  # where each ended connection's record goes (the access log)
        self.timer = timer
        self.poller = poller
        self.accepted = 0
        self.active = 0
        self.rejected = 0
        self.backoff = AcceptBackoff(f"listener {self.name}", log)
        self.internal_errors = 0
        self.bound: Address | None = None
        self._bound_early: socket.socket | None = None  # opened by `bind`, taken by `serve`
        self.connections: trio.Nursery | None = None  # where connection tasks run (outlives us)
        self.crew = Crew()  # our connection tasks, busy or idle (connection.py)
        self.scope = trio.CancelScope()
        self.closed = trio.Event()  # set once its listening socket is closed

    async def serve(
        self,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind (unless `bind` did), report the bound address, and accept into `connections`
        until cancelled."""
        self.connections = self.crew.nursery = connections
        with self.scope:
            await self.bind()
            sock, self._bound_early = self._bound_early, None
            assert sock is not None
            try:
                host, port = sock.getsockname()[:2]
                self.bound = Address(host, port)
                log.info("listener %s: listening on %s (pool %s)", self.name, self.bound,
                         self.config.pool or "-")  # fmt: skip
                task_status.started(self.bound)
                await self._accept_loop(sock)
            finally:
                self.crew.close()  # first: no task takes a client once the descriptor is closed
                close_socket(sock)
                self.closed.set()

    async def bind(self) -> None:
        """Open the listening socket before `serve` accepts on it: the balancer binds every
        listener before its pools start, so a replica's port (`spawn.free_port`) can never be
        one a listener is about to bind. Connections arriving meanwhile wait in the backlog."""
        if self._bound_early is None:
            self._bound_early = await self.open_socket(self.config.bind, self.config.backlog or somaxconn())

    def close_unserved(self) -> None:
        """Close a socket `bind` opened that `serve` never took (start-up failed in between)."""
        if self._bound_early is not None:
            close_socket(self._bound_early)
            self._bound_early = None

    @property
    def overloads(self) -> int:
        return self.backoff.overloads

    async def _accept_loop(self, sock: socket.socket) -> None:
        backoff, crew = self.backoff, self.crew
        acceptor = Acceptor(self, sock)
        arrival = ReadableWait(sock.fileno())
        crew.take = acceptor.take  # a task that ends its connection takes the next waiting client
        in_a_row = 0
        # Woken for a client and none counted (a task took it first): the count is trusted once; the
        # next such wake-up accepts even when the count says none, so a wrong count cannot make the
        # wait a loop.
        woke = doubt = False
        while True:
            # The tasks' allowance, anew at each step of this loop (they run only while it awaits).
            acceptor.allowance = ACCEPTS_PER_CHECKPOINT
            try:
                conn = acceptor.next(doubt=doubt)
            except OSError as exc:
                await backoff.back_off(exc)
                continue
            if conn is None:  # none waiting: wait for the next client
                doubt = woke and not doubt
                in_a_row = 0
                await arrival.wait()
                woke = True
                continue
            woke = doubt = False
            try:
                crew.run(conn)
            except BaseException:  # no task to own it (the nursery is closing): give back at once
                conn.close()
                raise
            in_a_row += 1
            if in_a_row >= ACCEPTS_PER_CHECKPOINT:
                in_a_row = 0
                await trio.lowlevel.checkpoint()

    def stop(self) -> None:
        """Stop accepting now: the accept loop is cancelled (the socket closes when it next runs),
        and from this moment no connection task takes a client that is waiting (`Crew.take`)."""
        self.crew.take = None
        self.scope.cancel()

    def over_limit(self) -> bool:
        limits = self.limits
        if self.config.max_connections and self.active >= self.config.max_connections:
            return True
        return bool(limits.max_connections and limits.active >= limits.max_connections)

    def reconfigure(self, config: ListenerConfig) -> None:
        """A reload changed this listener's options, pool or routes (its bind stays)."""
        self.config = config
        self.pool = self.pools.get(config.pool)
        self.routes = RouteTable(config.routes)
        self.admission.configure(config)
        self.screening = config.screens_clients
        self.opening = _opening_for(config)


def set_nodelay(sock: socket.socket) -> bool:
    """Set TCP_NODELAY on `sock`; False when it is not a TCP socket (or refuses)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def _opening_for(config: ListenerConfig) -> tuple[Stage, ...]:
    """What a connection to this listener does before connecting, in order (connection.py)."""
    stages: list[Stage] = []
    if config.accept_proxy:
        stages.append(read_header)
    if config.routes or config.tls:
        stages.append(open_tls)
    return tuple(stages)


async def open_listen_socket(
    bind: Address, backlog: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A non-blocking listening socket; "" as host means every IPv4 interface.

    A host name is resolved without blocking the event loop; failures become
    AnubisError naming the address. `reuse_port` sets SO_REUSEPORT (only ask
    where it exists); `listen=False` only binds, to hold the address.
    """
    host = bind.host or "0.0.0.0"
    try:
        infos = await trio.socket.getaddrinfo(host, bind.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AnubisError(f"binding {bind}: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AnubisError(f"binding {bind}: {exc.strerror or exc}") from None
    return sock
