"""A connection's life, owned in one place: what it holds, how it ends, what it leaves behind.

Theory of operation (h11's `_state.py` is the model): everything that decides
how a connection ends, and everything a connection must give back, lives in
this file.

- `Connection` is made by the listener at accept and is the one owner of the
  connection from then on: its client socket, its server socket once
  connected, its record (the access log's line, the counters), its end state
  and every resource it holds. The connection's task (connection.py) runs
  `with conn:` around its whole life; `Connection.__exit__` runs however that
  life ends (the relay's end, a refusal, a timeout, a failed handshake, the
  client leaving early, cancellation by a stop, a bug) and gives everything
  back in one place (`close`), so no path has to remember to.
- What a connection holds, and where it is given back:
  the listener's and the process's connection counts (`Limits`): taken by
  the constructor; a per-client slot of the listener's admission
  (`counted`): taken by `admit`; a server slot (`picked`, `SERVER`):
  `reserve`, given back early by `unreserve` when that connect fails; a place
  in a pool's line of held clients (`TICKET`): `join_line`, given back early
  by `leave_line` once connected; the Timer's watch (`WATCHED`): `watch`. The
  bits in `holding` say which are held; `close` gives back each that is.
- The end state is decided here, by one call: `end_with(state)`, first
  decision wins, and it stops the relay if one runs. Stages and relays report
  what happened (a reset seen while reading, a second EOF, a refusal) and
  never assign `end` themselves. `close` decides what was left open: a bug is
  `internal_error`, a cancellation `shutdown`, and a normal end while the
  balancer drains is `drained`.
- `Flow` is the accounting core every relay shape shares (the socket relay of
  relay.py on either readiness backend, the stream relay of streams.py for TLS
  and filters): each direction counts its own bytes; `moved` stamps the first
  byte each way (least_time's first-byte sample), `eof` turns the second EOF
  into the end (the side that sent EOF first names it), `failed` names the
  side that failed. `Way` (`UP`, `DOWN`) says which side a direction reads
  from and writes to, so blame is a lookup, not a branch.

Closing: a connection that did not end cleanly (`CLOSED_CLEANLY`) resets both
sockets (SO_LINGER 0), so no peer mistakes a cut for a complete transfer.
Sockets the readiness backend waited on are closed through it; sockets that
Trio's own waits saw (TLS, the stream relay, the opening stages) are announced
with `notify_closing` first.

The record: a finished `Connection` is what the listener's sink (the access
log) receives; `listener`, `server`, `client`, `bytes_in` and `bytes_out` read
as `ConnectionRecord`'s do (record.py).
"""

from __future__ import annotations

import _socket
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, Protocol, TypeVar, final, get_args

import trio
from mypy_extensions import mypyc_attr

from trioanubis.proxy.connect import as_stdlib

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

    from trioanubis.config import ListenerConfig
    from trioanubis.hold_queue import HoldQueue
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.admission import Admission
    from trioanubis.proxy.connect import Connecting
    from trioanubis.proxy.io.base import Readiness
    from trioanubis.proxy.sni_routes import RouteTable

log = logging.getLogger("trioanubis.connection")

# How a connection ended (the access log's `end`, the counters' keys).
EndState = Literal[
    "client_eof",  # the client sent EOF first, then the server: a normal end
    "server_eof",  # the server sent EOF first, then the client: a normal end
    "drained",  # ended normally while the balancer was draining
    "client_reset",  # the client reset or failed
    "server_reset",  # the server reset or failed
    "idle_timeout",  # no byte either way for idle_timeout (or half_close_timeout)
    "client_abort",  # the client left before it was relayed (connecting, held, or in its opening)
    "connect_failed",  # every attempt to connect failed
    "no_server",  # no server could take the connection
    "queue_full",  # no server could take it and max_queued clients were held already
    "queue_timeout",  # held for queue_timeout and no server could take it
    "refused",  # allow/deny or a per-client limit refused the client a PROXY header named
    "proxy_header",  # the PROXY header was invalid or incomplete
    "proxy_timeout",  # no whole PROXY header within proxy_timeout
    "no_route",  # SNI routing found no pool for it, and the listener has no fallback
    "handshake_failed",  # the client's TLS handshake failed
    "peek_timeout",  # no whole ClientHello (or handshake) within peek_timeout
    "fault_reset",  # an injected fault (reset_after) reset it on purpose
    "fault_close",  # an injected fault (close_after) closed it on purpose, with FIN
    "internal_error",  # a bug ended this connection (logged with its traceback)
    "shutdown",  # cut by the balancer stopping
]
END_STATES: Final = get_args(EndState)
# Ends after which both sockets close with FIN: both sides finished, nothing was
# relayed, or an injected close_after asked for exactly that. Every other end (a
# peer's reset, idle or half-close timeout, a stop, a bug, fault_reset) resets
# both sides, so no peer takes a cut for a complete transfer.
CLOSED_CLEANLY: Final[frozenset[EndState]] = frozenset(
    {"client_eof", "server_eof", "drained", "connect_failed", "no_server", "client_abort", "queue_full",
     "queue_timeout", "refused", "proxy_header", "proxy_timeout", "no_route", "handshake_failed",
     "peek_timeout", "fault_close"}
)
# Normal ends, which become "drained" while the balancer drains.
_NORMAL: Final = frozenset({"client_eof", "server_eof"})
# The side that sent EOF first, while the other still sends.
FirstEof = Literal["", "client_eof", "server_eof"]

# What `holding` marks as held (the Limits counts and the per-client slot have fields of their own).
SERVER: Final = 1  # a slot of `picked` (Pool.reserve)
TICKET: Final = 2  # a place in `pool.held`
WATCHED: Final = 4  # the Timer looks at this connection
TRIO_WAITED: Final = 8  # Trio's own waits saw the sockets: notify_closing before closing them

# SO_LINGER on, with a zero timeout: close() sends a reset and drops unsent bytes.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


@final
@dataclass(frozen=True, slots=True)
class Way:
    """Which way a direction moves bytes: who it reads from, who it writes to, what their failures mean."""

    upstream: bool  # client → server
    read_failed: EndState  # its source failed
    write_failed: EndState  # its destination failed
    eof: FirstEof  # its source sent EOF


UP: Final = Way(True, "client_reset", "server_reset", "client_eof")
DOWN: Final = Way(False, "server_reset", "client_reset", "server_eof")


@mypyc_attr(allow_interpreted_subclasses=True)  # streams.py's direction is not compiled (setup.py)
class Counted:
    """A relay's direction, as the accounting sees it: relay.py's and streams.py's directions derive
    from it (a class, not a protocol, so that the compiled `Flow.moved` reads its fields natively)."""

    __slots__ = ("bytes", "way")

    def __init__(self, way: Way) -> None:
        self.way = way
        self.bytes = 0  # moved this way


class Record(Protocol):
    """A finished connection, as the access log sees it."""

    @property
    def listener(self) -> str: ...
    @property
    def client(self) -> str:
        """The client as host:port (`[host]:port` for IPv6)."""
        ...

    @property
    def server(self) -> str:
        """The server's name, "-" when it reached none."""
        ...

    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def ended(self) -> float: ...
    @property
    def end(self) -> EndState | Literal[""]: ...


# Where a listener hands each ended connection (the access log's `log`).
RecordSink = Callable[[Record], None]


@final
class Limits:
    """The process-wide connection count and limit, shared by every listener, and the accept order."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.active = 0
        self.accepted = 0  # connections accepted so far: each takes the next number (its place in line)
        self.draining = False  # connections that end normally now end as "drained"
        self._idle = trio.lowlevel.ParkingLot()

    def release(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.unpark_all()

    async def wait_idle(self) -> None:
        """Return once no connection is open, whichever listener accepted it."""
        while self.active:
            await self._idle.park()


class Watcher:
    """What keeps a connection's timeouts: timeouts.py's `Timer` derives from it (a class, not a
    protocol, so that the compiled connection calls it natively)."""

    def watch(self, conn: Connection) -> None:
        raise NotImplementedError

    def unwatch(self, conn: Connection) -> None:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)  # tests/conftest.py's StubOrigin is not compiled
class Origin:
    """What a connection needs from the listener that accepted it: listener.py's `Listener` derives
    from it (a class, not a protocol, so that the compiled connection reads these natively).

    Its config, pools, routes and counters are for the opening stages (header_io.py, tls_opening.py).
    """

    name: str
    opening: tuple[Callable[[Connection], Awaitable[bool]], ...]  # the stages before connecting; () if none
    pool: Pool | None
    config: ListenerConfig
    pools: Mapping[str, Pool]
    routes: RouteTable
    tls_counts: dict[str, int]
    poller: Readiness
    timer: Watcher
    limits: Limits
    admission: Admission
    on_record: RecordSink
    # Where connection tasks run: what may outlive a connection's relay (a mirror) runs there.
    connections: trio.Nursery | None
    active: int
    internal_errors: int


DirectionT = TypeVar("DirectionT", bound=Counted)


@mypyc_attr(allow_interpreted_subclasses=True)  # streams.py's relay is not compiled (setup.py)
class Flow(Generic[DirectionT]):
    """The accounting core of a relay, whatever moves its bytes (relay.py, streams.py).

    `active` is set by every move (the Timer turns it into `last_activity`);
    `stop` is the shape's own: end its moving now (the connection decided the end).
    """

    __slots__ = ("active", "conn", "down", "first_eof", "first_sent", "last_activity", "over", "up")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.up: DirectionT | None = None  # client → server, once the shape made its directions
        self.down: DirectionT | None = None
        self.active = True  # connecting just ended: idle from the Timer's next look on
        self.last_activity = 0.0  # when the Timer last saw it active
        self.first_eof: FirstEof = ""  # the side that sent EOF first
        self.first_sent = 0.0  # when the first client byte went towards the server
        self.over = False  # the connection ended: move nothing more

    def stop(self) -> None:
        """End the moving now: the relay's task returns soon (each shape knows how)."""
        self.over = True

    def moved(self, direction: Counted, count: int) -> None:
        """`count` more bytes went `direction`'s way (stamps the first byte each way)."""
        self.active = True
        if not direction.bytes:  # the first byte this way: the clock is read for least_time's sample only
            if direction.way.upstream:
                self.first_sent = self.conn.origin.poller.now()
            elif self.first_sent:
                self.conn.first_byte(self.conn.origin.poller.now() - self.first_sent)
        direction.bytes += count

    def eof(self, way: Way) -> bool:
        """`way`'s source sent EOF: False to pass it on (the other way flows on), True when both did.

        The second EOF ends the connection, named after the side that sent EOF first.
        """
        self.active = True
        if self.first_eof:
            self.conn.end_with(self.first_eof)
            return True
        self.first_eof = way.eof
        return False

    def failed(self, way: Way, *, reading: bool) -> None:
        """Reading from `way`'s source (or writing to its destination) failed: that side ended it."""
        self.conn.end_with(way.read_failed if reading else way.write_failed)


@final
class Extras:
    """What only some connections carry: kept apart so that a plain connection pays one empty slot."""

    __slots__ = ("client_tls", "local", "prefix", "server_tls")

    def __init__(self) -> None:
        self.local: tuple[str, int] | None = None  # where the client connected to, as a PROXY header said
        self.prefix = b""  # the client's bytes read while routing (its ClientHello): sent to the server first
        self.client_tls: trio.abc.HalfCloseableStream | None = None  # TLS terminated here
        self.server_tls: trio.abc.HalfCloseableStream | None = None  # TLS originated here


@final
class Connection:
    """One accepted client connection, from accept to close (see the module docstring)."""

    __slots__ = (
        "bytes_in", "bytes_out", "client_sock", "connecting", "counted", "early", "end", "ended", "extras",
        "holding", "origin", "peer", "picked", "pool", "relay", "seq", "server_sock", "started",
    )  # fmt: skip

    def __init__(self, origin: Origin, client_sock: _socket.socket, peer: tuple[object, ...],
                 pool: Pool | None, counted: str | None = None) -> None:  # fmt: skip
        limits = origin.limits
        origin.active += 1
        limits.active += 1
        limits.accepted += 1
        self.seq = limits.accepted  # accept order: the place in any pool's line of held clients
        self.origin = origin
        self.client_sock = client_sock
        self.peer = peer  # the client: from accept, or from a PROXY header (IPv4-mapped written as IPv4)
        self.extras: Extras | None = None  # what only some connections carry (TLS, a prefix, ...)
        self.early = b""  # the client's bytes read before connecting (connection.py), until relayed
        self.pool = pool  # the pool it goes to (a route may choose another)
        self.counted = counted  # the per-client slot it holds (the address counted), if any
        self.holding = 0
        self.started = origin.poller.now()
        self.ended = 0.0
        self.end: EndState | Literal[""] = ""
        self.picked: Server | None = None  # the server it was last sent to (the record's `server`)
        self.server_sock: _socket.socket | None = None
        self.connecting: Connecting | None = None  # while connecting or held (the Timer checks it)
        self.relay: Flow[Any] | None = None  # while relaying
        self.bytes_in = self.bytes_out = 0  # client → server, server → client: the relay's, once ended

    # ------------------------------------------------------------ the end

    def end_with(self, state: EndState) -> None:
        """Decide how this connection ends (the first decision wins) and stop its relay if one runs."""
        if self.end:
            return
        self.end = state
        relay = self.relay
        if relay is not None:
            relay.stop()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Give back everything, close the sockets, report the record; swallow a bug, never a cancellation."""
        bug = isinstance(exc, Exception)
        if exc is not None and not self.end:
            self.end = "internal_error" if bug else "shutdown"
        if bug:
            # A bug or an unforeseen error ends this connection only, never the process.
            log.error("listener %s: connection from %s failed unexpectedly", self.origin.name, self.client,
                      exc_info=exc)  # fmt: skip
        self.close()
        return bug

    def close(self) -> None:
        """The one exit: give back what is held, close both sockets, stamp and report the record."""
        origin = self.origin
        end = self.end or "shutdown"
        if end in _NORMAL and origin.limits.draining:
            end = "drained"
        self.end = end
        relay = self.relay
        if relay is not None:
            self.relay = None  # the relay points back here: no cycle outlives the connection
            if relay.up is not None and relay.down is not None:  # what was sent before the relay counts too
                self.bytes_in, self.bytes_out = self.bytes_in + relay.up.bytes, relay.down.bytes
        connected = self._give_back()
        # Bytes read early and never relayed: the client must not take the close for an answer
        # (closing with them unread made the kernel reset; they are read now, so reset ourselves).
        self._close_sockets(end not in CLOSED_CLEANLY or bool(self.early))
        origin.active -= 1
        origin.limits.release()
        if end == "internal_error":
            origin.internal_errors += 1
        self.ended = origin.poller.now()
        if connected and self.pool is not None:  # the pool's durations: connections it was asked for
            self.pool.durations.observe(self.ended - self.started)
        try:
            origin.on_record(self)
        except Exception:  # a bug in the access log ends nothing else
            log.exception("listener %s: recording the connection from %s failed", origin.name, self.client)

    def _give_back(self) -> bool:
        """Give back what `holding` says is held; True if the connection got as far as connecting."""
        holding, pool = self.holding, self.pool
        self.holding = holding & TRIO_WAITED
        if holding & TICKET and pool is not None:
            pool.held.leave(self)
        if holding & WATCHED:
            self.origin.timer.unwatch(self)
        if holding & SERVER and pool is not None and self.picked is not None:
            pool.release(self.picked, self.bytes_in, self.bytes_out)
        if self.counted is not None:
            self.origin.admission.release(self.counted)
            self.counted = None
        return bool(holding & WATCHED)

    def _close_sockets(self, reset: bool) -> None:
        # The server's, then the client's (written out: a loop over the pair builds and iterates a
        # tuple generically in the compiled build).
        trio_waited = bool(self.holding & TRIO_WAITED)
        if self.server_sock is not None:
            self._close_socket(self.server_sock, reset, trio_waited)
        self._close_socket(self.client_sock, reset, trio_waited)

    def _close_socket(self, sock: _socket.socket, reset: bool, trio_waited: bool) -> None:
        if sock.fileno() < 0:
            return
        if reset:
            with contextlib.suppress(OSError):  # already failed: the close that follows is all there is
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if trio_waited:
            trio.lowlevel.notify_closing(sock)
        self.origin.poller.close(sock)

    # ------------------------------------------------------- what it holds

    def admitted(self, client: str) -> None:
        """The listener's admission counted this connection for `client` (given back at close)."""
        self.counted = client

    def reserve(self, server: Server) -> None:
        """Take a slot of `server` (in the same step as its pick: it counts against max_connections now)."""
        assert self.pool is not None and not self.holding & SERVER
        self.pool.reserve(server)
        self.picked = server
        self.holding |= SERVER

    def unreserve(self) -> None:
        """The connect to `picked` failed: its slot is free again (the record keeps the name)."""
        assert self.pool is not None and self.picked is not None and self.holding & SERVER
        self.holding &= ~SERVER
        self.pool.release(self.picked)

    def join_line(self, line: HoldQueue, capacity: int) -> bool:
        """Take this connection's place (by accept order) in `line`; False when the line is full for it."""
        if not line.join(self, capacity):
            return False
        self.holding |= TICKET
        return True

    def leave_line(self) -> None:
        """Give the place in line back (connected, or leaving); the next in line gets its turn."""
        if self.holding & TICKET:
            assert self.pool is not None
            self.holding &= ~TICKET
            self.pool.held.leave(self)

    def watch(self) -> None:
        """Let the Timer look after this connection (connect and idle timeouts) until it closes."""
        if not self.holding & WATCHED:
            self.holding |= WATCHED
            self.origin.timer.watch(self)

    @property
    def more(self) -> Extras:
        """This connection's `Extras`, made on first use."""
        extras = self.extras
        if extras is None:
            extras = self.extras = Extras()
        return extras

    def waited_by_trio(self) -> None:
        """Trio's own waits saw this connection's sockets: they are announced before they are closed."""
        self.holding |= TRIO_WAITED

    def trio_client(self) -> socket.socket:
        """The client's socket as Trio's streams take it (`as_stdlib`), this connection's from now on."""
        sock = self.client_sock = as_stdlib(self.client_sock)
        return sock

    def trio_server(self) -> socket.socket:
        """The server's socket as Trio's streams take it (`as_stdlib`), this connection's from now on."""
        assert self.server_sock is not None
        sock = self.server_sock = as_stdlib(self.server_sock)
        return sock

    def first_byte(self, seconds: float) -> None:
        """The server's first byte came `seconds` after the client's first (least_time's sample)."""
        pool, server = self.pool, self.picked
        if pool is not None and server is not None and pool.config.least_time == "first_byte":
            pool.record_time(server, seconds)

    # ------------------------------------------------------------ the record

    @property
    def listener(self) -> str:
        return self.origin.name

    @property
    def server(self) -> str:
        return self.picked.name if self.picked is not None else "-"

    @property
    def client(self) -> str:
        """The client as host:port (formatted when needed: most connections are never logged)."""
        host = str(self.peer[0])
        return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"


def normalise_peer(addr: tuple[object, ...]) -> tuple[object, ...]:
    """A client address with an IPv4-mapped IPv6 host (a dual-stack listener's IPv4 client) as IPv4.

    The one client has one address for every purpose: the per-client limits,
    allow/deny, the access log, /stats, source_hash and the PROXY header sent on.
    """
    host = addr[0]
    if isinstance(host, str) and ":" in host and "." in host:
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(host.partition("%")[0]).ipv4_mapped
            if mapped is not None:
                return (str(mapped), addr[1])
    return addr
