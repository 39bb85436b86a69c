"""The stream relay: a connection with TLS on either side, or with byte filters, over Trio streams.

Theory of operation: the socket relay (relay.py, with the poller's inline
steps and splice) moves plain bytes between two sockets with no filter. A
connection that needs more — TLS termination or origination (its bytes
decrypted and encrypted), or `Filter`s on its bytes (filters.py: injected
faults, and whatever else a filter does) — is relayed here instead, chosen
once per connection by connection.py. Every combination composes: filters
apply through TLS as on plain TCP, because this relay only sees two `Side`s,
each a Trio half-closeable stream (a `TlsStream` or a `trio.SocketStream`
over the plain socket) with its socket beside it, and a filter only sees
bytes.

The relay is a `Flow` (lifecycle.py), so counting, the first byte each way,
EOF, blame and the Timer's idle clock are the socket relay's, decided in
the same place; what differs is only how bytes move. Each direction is a
`StreamDirection`:

- without filters, one pump task: receive one chunk (at most `CHUNK_SIZE`),
  send it whole, receive again (backpressure: at most one chunk held, besides
  one TLS record in each BIO);
- with filters, two tasks: a reader that moves bytes from its source, through
  each filter's `on_read`, into a FIFO of (due time, bytes), and a sender that
  takes them off in order when due (the filters' delays) and delivers them in
  the pieces the filters allow, waiting as they say, up to a cut. The
  FIFO holds at most `QUEUE_BOUND` bytes, counting what is being sent: a full
  queue stops the reader, so a slow or delayed direction pushes back on its
  sender (TCP backpressure) rather than growing. With latency L a direction
  carries at most QUEUE_BOUND per L.

What a relay promises still holds: bytes leave in the order they came, EOF
(close_notify, or FIN on a plain side) is passed on after the last byte as
`send_eof` and the other direction keeps flowing (half-close), a reset or a
TLS error ends the connection naming the side that failed. The filters' cuts
end it on purpose, naming the end (an injected `fault_close` is a clean
close; `fault_reset` a reset after the kernel has sent the bytes before the
cut, so the peer receives exactly `reset_after` bytes and then ECONNRESET). A
filter may swallow EOF (a blackhole: a dead link, not a closed one).

The sockets of a connection relayed here left the readiness backend's epoll
(`Readiness.unregister`) when it was chosen; Trio waits on them, and the
connection announces them to Trio before it closes them.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import sys
from collections import deque
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.proxy.filters import Filters, any_delays
from trioanubis.proxy.io.base import CHUNK_SIZE
from trioanubis.proxy.lifecycle import DOWN, UP, Counted, Flow, Way

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection, EndState

# Bytes one filtered direction may hold (queued or being sent): the socket relay's bound.
QUEUE_BOUND: Final = CHUNK_SIZE
# Before a reset, how long the kernel gets to send what precedes the cut.
DRAIN_LIMIT: Final = 2.0
_DRAIN_POLL: Final = 0.001
# What a stream raises when its peer or its transport failed.
_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_DOWN_TASK_NAME: Final = "trioanubis.streams.server_to_client"


def socket_stream(sock: socket.socket) -> trio.SocketStream:
    """A Trio stream over a connection's plain socket (the connection keeps owning the socket)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@final
class Replayed(trio.abc.HalfCloseableStream):
    """A client's stream whose first bytes were read before connecting (`Connection.early`): its
    first reads give them, then it is the stream itself."""

    __slots__ = ("first", "stream")

    def __init__(self, stream: trio.abc.HalfCloseableStream, first: bytes) -> None:
        self.stream = stream
        self.first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        first = self.first
        if not first:
            return await self.stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(first) if max_bytes is None else max_bytes
        self.first = first[size:]
        return first[:size]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@final
class Side:
    """One end of a stream-relayed connection: the stream bytes move through, and its socket."""

    __slots__ = ("sock", "stream")

    def __init__(self, stream: trio.abc.HalfCloseableStream, sock: _socket.socket) -> None:
        self.stream = stream
        self.sock = sock


@final
class StreamRelay(Flow["StreamDirection"]):
    """A connection relayed over two streams, each direction with its filters (or none)."""

    __slots__ = ("scope",)

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.scope: trio.CancelScope | None = None

    def stop(self) -> None:
        self.over = True
        if self.scope is not None:
            self.scope.cancel()

    async def run(self, client: Side, server: Side, up: Filters, down: Filters) -> None:
        """Relay until both sides sent EOF or one failed (or the connection stops it)."""
        self.up = StreamDirection(self, UP, client, server, up)
        self.down = StreamDirection(self, DOWN, server, client, down)
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            if self.over:
                nursery.cancel_scope.cancel()
            self.down.start(nursery, _DOWN_TASK_NAME)
            self.up.start(nursery, None)


@final
class StreamDirection(Counted):
    """One direction of a stream relay: its sides, its filters, its FIFO and what it moved (`bytes`:
    delivered this way)."""

    __slots__ = ("_arrived", "_room", "delayed", "delivered", "dst", "filters", "held", "queue", "relay",
                 "src")  # fmt: skip

    def __init__(self, relay: StreamRelay, way: Way, src: Side, dst: Side, filters: Filters) -> None:
        super().__init__(way)
        self.relay = relay
        self.src, self.dst = src, dst
        self.filters = filters
        self.delayed = any_delays(filters)
        self.queue: deque[tuple[float, bytes]] = deque()  # (due, data); b"" is the EOF
        self.held = 0  # bytes queued or being sent: at most QUEUE_BOUND
        self.delivered = 0  # what the filters count (a cut after N bytes)
        self._room = trio.lowlevel.ParkingLot()  # the reader, waiting for the queue to shrink
        self._arrived = trio.lowlevel.ParkingLot()  # the sender, waiting for the queue to fill

    def start(self, nursery: trio.Nursery, name: str | None) -> None:
        if not self.filters:
            nursery.start_soon(self.pump, name=name)
            return
        for each in self.filters:
            each.start(self.relay.conn, nursery)
        nursery.start_soon(self.read, name=name)
        nursery.start_soon(self.send, name=name)

    # ------------------------------------------------------- without filters

    async def pump(self) -> None:
        relay, src, dst = self.relay, self.src.stream, self.dst.stream
        while True:
            try:
                data = await src.receive_some(CHUNK_SIZE)
            except _STREAM_ERRORS:
                relay.failed(self.way, reading=True)
                return
            if not data:
                await self._pass_eof(forward=True)
                return
            try:
                await dst.send_all(data)
            except _STREAM_ERRORS:
                relay.failed(self.way, reading=False)
                return
            relay.moved(self, len(data))

    async def _pass_eof(self, *, forward: bool) -> None:
        """The source sent EOF: pass it on (unless a filter swallows it), then count it."""
        if forward:
            try:
                await self.dst.stream.send_eof()
            except _STREAM_ERRORS:
                self.relay.failed(self.way, reading=False)
                return
        self.relay.eof(self.way)

    # ------------------------------------------------------- with filters: reading

    async def read(self) -> None:
        relay, src, filters = self.relay, self.src.stream, self.filters
        while True:
            room = QUEUE_BOUND - self.held
            if room <= 0:
                await self._room.park()
                continue
            try:
                received = await src.receive_some(room)
            except _STREAM_ERRORS:
                relay.failed(self.way, reading=True)
                return
            relay.active = True
            data: bytes | None = bytes(received)
            for each in filters:
                if data:
                    data = each.on_read(data)
            if data is None:
                continue  # dropped (receive_some checkpoints, so a flood still yields)
            self._push(data)
            if not data:
                return

    def _push(self, data: bytes) -> None:
        delay = sum(each.delay() for each in self.filters) if self.delayed else 0.0
        self.queue.append((trio.current_time() + delay if delay > 0 else 0.0, data))
        self.held += len(data)
        self._arrived.unpark_all()

    # ------------------------------------------------------- with filters: sending

    async def send(self) -> None:
        while True:
            if not self.queue:
                await self._arrived.park()
                continue
            due, data = self.queue[0]
            if due and due > trio.current_time():
                await trio.sleep_until(due)
            self.queue.popleft()
            if not data:
                forward = True
                for each in self.filters:
                    forward = await each.on_eof() and forward
                await self._pass_eof(forward=forward)
                return
            delivered = await self._deliver(memoryview(data))
            self.held -= len(data)
            self._room.unpark_all()
            if not delivered:
                return

    async def _deliver(self, view: memoryview) -> bool:
        """Send one chunk piece by piece as the filters say; False when the connection ends here."""
        filters = self.filters
        while view:
            piece = len(view)
            for each in filters:
                piece = each.piece(piece, self.delivered)
            for each in filters:
                await each.before_piece(piece)
            try:
                await self.dst.stream.send_all(view[:piece])
            except _STREAM_ERRORS:
                self.relay.failed(self.way, reading=False)
                return False
            self.relay.moved(self, piece)
            self.delivered += piece
            view = view[piece:]
            for each in filters:
                end = await each.after_piece(self.delivered, bool(view))
                if end is not None:
                    await self._cut(end)
                    return False
        return True

    async def _cut(self, end: EndState) -> None:
        """A filter ends the connection here: a reset after the bytes before it left, or a clean close."""
        conn = self.relay.conn
        if end == "fault_reset":
            # A reset drops what the kernel still holds: let it send the bytes before the cut.
            with trio.move_on_after(DRAIN_LIMIT):
                while _unsent(self.dst.sock):
                    await trio.sleep(_DRAIN_POLL)
        conn.end_with(end)


def _unsent(sock: _socket.socket) -> bool:
    """Whether `sock` still holds bytes its peer has not acknowledged (Linux: SIOCOUTQ).

    Elsewhere there is no portable way to ask; False, and the reset may take
    the last bytes with it (a real network's reset does too).
    """
    try:
        import fcntl  # Unix only: imported here, never at import time
        import termios

        outq = getattr(termios, "TIOCOUTQ", None)
        if outq is None:
            return False
        buffer = fcntl.ioctl(sock.fileno(), outq, b"\0\0\0\0")
    except (ImportError, OSError):
        return False
    return int.from_bytes(buffer, sys.byteorder) > 0


def release_to_trio(conn: Connection) -> None:
    """Hand the connection's sockets from the readiness backend to Trio's own waits (streams use them)."""
    poller = conn.origin.poller
    for sock in (conn.client_sock, conn.server_sock):
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):  # never registered: nothing to leave
                poller.unregister(sock.fileno())
    conn.waited_by_trio()
