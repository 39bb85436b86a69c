"""One connection's task: its stages in order, from accept to close.

Theory of operation: the listener makes a `Connection` (lifecycle.py) for
each client it accepts and hands it to its `Crew`, which gives it to one of
the listener's connection tasks (`run_connections`): one task owns the
connection for its whole life. Inside `with conn:` (so whatever happens, the
connection gives back everything it took, closes its sockets and reports its
record) the task runs a short pipeline:

1. the opening, what the listener asks for, in order (`Listener.opening`):
   the PROXY header and the admission of the client it names (header_io.py),
   then with `routes` or `tls` the ClientHello, the route and the handshake
   (tls_opening.py). A listener with none has an empty opening: its clients
   were judged at accept, before the task existed;
2. the client's first bytes, when it sent them already and its socket is
   still the plain one accept gave (`read_early`): they let the
   connect delay its last ACK until they go, and the relay sends them first;
3. connecting (failover.py): pick a server, connect (the PROXY header, TLS
   origination and the bytes read while routing are part of each attempt),
   fail over, and hold the client while no server can take it;
4. the relay, chosen once: the socket relay (relay.py) when both sides are
   plain and no filter wants the bytes (makers.py, filters.py: the fast path, epoll's
   inline steps, splice), or the only filter is a mirror (its `Tap`, copied from
   the socket relay's reads), else the stream relay (streams.py: TLS on either
   side, filters), through which every filter composes with every transport.

A stage that ends the connection has decided how (`Connection.end_with`)
and returns False; the task then only leaves `with conn:`. The relay's task
is this task: an idle plain connection is this coroutine, which keeps one
local, and the backend's `drive` (the relay adds no frame).

Connection tasks are recycled, as a C balancer recycles its stream
structures: after `with conn:` the task parks in its crew (`Crew.wait`) and
the listener hands it its next client (`Crew.run`), so a connection costs a
park and a wake-up instead of a task's spawn and end (Trio's spawn alone was
~29,000 of a connection's ~172,000 instructions). Before parking, a task
takes a client that is waiting in the listener's backlog already
(`Crew.take`, the listener's `Acceptor`): where clients queue, the end of
one connection and the start of the next are one step of one task, not two
(a Trio task step is ~23,500 instructions on CPython 3.11). The tasks still
live in the connections nursery: cancelling it ends the busy and the idle
ones alike, and nothing of a connection outlives its `with conn:`. A crew keeps at most
`IDLE_TASKS` idle tasks (more end), and a closed listener's crew ends its idle
tasks at once and its busy ones after their connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.proxy.connect import send_delayed_ack
from trioanubis.proxy.failover import connect
from trioanubis.proxy.filters import Filters
from trioanubis.proxy.io.sockcalls import recv_into
from trioanubis.proxy.io.woken import WOKEN, parking
from trioanubis.proxy.makers import filters_for
from trioanubis.proxy.relay import Relay, Tap
from trioanubis.proxy.streams import Replayed, Side, StreamRelay, release_to_trio, socket_stream

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection

# A constant task name for every connection's task: Trio would otherwise format one string per task.
CONNECTION_TASK_NAME: Final = "trioanubis.connection"

# An opening stage: what a listener does before connecting; False when it ended the connection.
Stage = Callable[["Connection"], Awaitable[bool]]


# Idle tasks a listener's crew keeps for its next clients: each a parked task (2.5-2.8 KiB,
# tracemalloc), so at most 0.7 MiB per listener.
IDLE_TASKS: Final = 256

# Trio's calls, the shared wake-up and the early read's system call, read once: in the compiled
# build a module-level Final is a static, a module global a lookup by name at every use.
_reschedule: Final = trio.lowlevel.reschedule
_current_task: Final = trio.lowlevel.current_task
_WOKEN: Final = WOKEN
_recv_into: Final = recv_into
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED


@final
class Crew:
    """A listener's connection tasks: each runs one connection at a time and, between two, waits to
    be handed the next one instead of ending (see the module docstring)."""

    __slots__ = ("closed", "idle", "most", "nursery", "spawned", "take")

    def __init__(self, most: int = IDLE_TASKS) -> None:
        self.idle: list[Berth] = []  # the tasks parked in `wait`, the last one parked last
        self.most = most  # idle tasks kept; one that would be more ends
        self.closed = False  # the listener closed: a task that finishes its connection ends
        self.spawned = 0  # tasks started, ever (the rest of the connections ran in idle ones)
        self.nursery: trio.Nursery | None = None  # where connection tasks run (outlives the listener)
        # The listener's accept, once it accepts (listener.py's `Acceptor.take`): a client waiting
        # in the backlog, accepted and admitted now, or None (it bounds how many between two steps
        # of its accept loop).
        self.take: Callable[[], Connection | None] | None = None

    def run(self, conn: Connection) -> None:
        """Run `conn` in the task that went idle last, else in a new task in `nursery`."""
        if self.idle:
            berth = self.idle.pop()
            berth.conn = conn
            _reschedule(berth.task, _WOKEN)
            return
        assert self.nursery is not None
        self.nursery.start_soon(run_connections, self, conn, name=CONNECTION_TASK_NAME)
        self.spawned += 1

    def wait(self, berth: Berth, park: Awaitable[object]) -> Awaitable[object]:
        """Park `berth`'s task (the caller) until `run` hands it a connection (`berth.conn`; None: the
        crew closed); `await crew.wait(berth, park)`, `park` its `parking(berth.leave)` (a plain
        function: no frame of ours while parked)."""
        berth.task.custom_sleep_data = self  # what says "idle" to whoever looks (the tests)
        self.idle.append(berth)
        return park

    def close(self) -> None:
        """The listener closed: its idle tasks end, and busy ones after their connection."""
        self.closed = True
        self.take = None  # its socket is closed: its descriptor's number may be another's soon
        idle, self.idle = self.idle, []
        for berth in idle:
            _reschedule(berth.task, _WOKEN)


@final
class Berth:
    """A connection task's place in its crew, made once per task: how `Crew.run` hands it a client.

    The client goes in `conn` and the task is woken with the shared `WOKEN`,
    so a hand-over makes no `outcome` and looks nothing up in Trio's run
    context once the task exists (64 bytes a task, kept while it runs a connection).
    """

    __slots__ = ("conn", "crew", "task")

    def __init__(self, crew: Crew, task: trio.lowlevel.Task) -> None:
        self.crew = crew
        self.task = task
        self.conn: Connection | None = None  # handed by `Crew.run`, taken by the task when it wakes

    def leave(self, _: object) -> trio.lowlevel.Abort:
        """The abort callback of each wait: the task, cancelled while idle, leaves the crew. It may be
        gone from the list already: `run` took it, and a KeyboardInterrupt came before it was handed on."""
        idle = self.crew.idle
        if self in idle:
            idle.remove(self)
        return _SUCCEEDED


async def run_connections(crew: Crew, conn: Connection | None) -> None:
    """A connection task: the connection it was started for, then each one its crew hands it, from
    accept to close (see the module docstring), until the crew has enough idle tasks or closed."""
    berth: Berth | None = None
    park: Awaitable[object] | None = None
    while conn is not None:
        with conn:
            opened = True
            for stage in conn.origin.opening:
                if not await stage(conn):
                    opened = False
                    break
            if opened and (not _plain_client(conn) or read_early(conn)) and await connect(conn):
                await relay(conn)
        conn = None  # nothing of the connection is kept while idle
        if crew.closed:
            return
        if crew.take is not None:
            conn = crew.take()  # a client waiting already: its connection, in this step
            if conn is not None:
                continue
        if len(crew.idle) >= crew.most:
            return
        if berth is None or park is None:
            berth = Berth(crew, _current_task())
            # Each wait's await, made once (woken.py). A local, not the berth's: it holds the
            # berth's `leave`, and on the berth it would be a cycle outliving the task.
            park = parking(berth.leave)
        await crew.wait(berth, park)
        conn, berth.conn = berth.conn, None


# The most a connection reads of its client before connecting: held while it connects (and while
# it is held in a pool's line), so bounded as HAProxy's buffer is (tune.bufsize, 16 KiB).
EARLY_READ: Final = 16384


def read_early(conn: Connection) -> bool:
    """Take what the client has sent already, before connecting; False when it reset meanwhile.

    What HAProxy does in TCP mode: a client that speaks first (HTTP, TLS, most
    protocols) has usually sent its first bytes by the time its connection's
    task runs (95 % of the connection-rate workload's connections). With them
    in hand the server's socket connects with its last ACK delayed
    (connect.py's `delay_ack`) and the relay sends them first (relay.py,
    streams.py; epoll in its next batch, with the other new connections'),
    so the ACK travels with them: one packet less per connection, and a
    server that accepts is woken once, with its request there, instead of
    twice (the handshake, then the request). A client that has sent nothing
    yet costs one EAGAIN and connects as before, so a server that speaks
    first (SMTP, MySQL) is never kept waiting for an ACK.

    The bytes are the relay's first chunk (`Connection.early`): counted,
    mirrored and filtered as any. An EOF is left for the relay to read (it
    reads it again); a reset ends the connection now (`client_reset`), since
    a read after it would find a plain EOF.
    """
    scratch = conn.origin.poller.scratch  # the backend's read buffer (one task runs at a time)
    sock = conn.client_sock
    try:
        received = _recv_into(sock, sock.fileno(), scratch[:EARLY_READ])  # -1: nothing there yet
    except OSError:
        conn.end_with("client_reset")
        return False
    if received > 0:
        conn.early = bytes(scratch[:received])
    return True


def _plain_client(conn: Connection) -> bool:
    """The client is still the socket accept gave, and nothing of its was read for routing."""
    extras = conn.extras
    return extras is None or (extras.client_tls is None and not extras.prefix)


def relay(conn: Connection) -> Awaitable[None]:
    """The relay this connection needs, chosen once, as an awaitable for its task."""
    assert conn.server_sock is not None
    filters = filters_for(conn)
    extras = conn.extras
    if extras is None or (extras.client_tls is None and extras.server_tls is None):
        tap = None if filters is None else _tap(conn, filters)
        if filters is None or tap is not None:
            socket_relay = Relay(conn, conn.client_sock, conn.server_sock, conn.origin.poller, tap)
            conn.relay = socket_relay
            return socket_relay.run()  # the backend's drive: no frame of ours while the connection is idle
    return _relay_streams(conn, filters or ((), ()))


def _tap(conn: Connection, filters: tuple[Filters, Filters]) -> Tap | None:
    """The filters as one tap for the socket relay (a mirror alone: it only copies the client's
    bytes), its copy's task started where connections run; None when they need the stream relay."""
    up, down = filters
    nursery = conn.origin.connections
    if down or len(up) != 1 or nursery is None:
        return None
    tap = up[0].as_tap()
    if tap is not None:
        tap.begin(nursery)
    return tap


async def _relay_streams(conn: Connection, filters: tuple[Filters, Filters]) -> None:
    assert conn.server_sock is not None
    extras = conn.more
    release_to_trio(conn)
    client_stream = extras.client_tls or socket_stream(conn.trio_client())
    if conn.early:  # read before connecting: the stream gives them first
        client_stream, conn.early = Replayed(client_stream, conn.early), b""
        if filters[0] and extras.server_tls is None:
            # A fault or a rate limit may hold them back: the connect's ACK must not wait for them.
            send_delayed_ack(conn.server_sock)
    client = Side(client_stream, conn.client_sock)
    server = Side(extras.server_tls or socket_stream(conn.trio_server()), conn.server_sock)
    stream_relay = conn.relay = StreamRelay(conn)
    await stream_relay.run(client, server, *filters)
