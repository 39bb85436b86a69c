"""The copying relay of a faulted connection: every byte read, held, paced, cut as its plan says.

Theory of operation: a connection whose server has faults and whose draw
(trioanubis.faults) affected it is relayed here instead of by relay.py's
pumps: never splice, never the dispatcher's inline steps, so none of the fast
path's invariants has to know about faults, and an unfaulted connection pays
one attribute check (`server.faults is None`) and nothing else.

Each direction is a `_Direction` with two tasks in the connection's nursery:
a reader that moves bytes from its source socket into a FIFO of (due time,
bytes), and a sender that takes them off in order when due and delivers them
(in slices, paced by a token bucket, up to a cut). The FIFO holds at most
`QUEUE_BOUND` bytes, the per-direction bound of the fast path, counting
what is being sent: a full queue stops the reader, so a slow or delayed
direction pushes back on its sender (TCP backpressure) rather than growing.
With latency L a direction therefore carries at most QUEUE_BOUND per L.

What a relay promises still holds: bytes leave in the order they came, EOF
is passed on after the last byte (half-close), a reset or error on either
socket ends the connection with the same end states as relay.py. The cuts
end it on purpose: `fault_close` (a clean close: both sides get FIN once the
kernel sent what it holds) or `fault_reset` (both sides get a reset, after
the kernel has sent the bytes before the cut, so the peer receives exactly
`reset_after` bytes and then ECONNRESET). A blackholed direction reads and
drops, and passes no EOF either: a dead link, not a closed one.

Waits go through the relay's readiness backend without a stepper (plain
waits), and only after EAGAIN: safe on the edge-triggered epoll backend, and
the reader always reads to EAGAIN before it waits, so a FIN queued behind
data is never missed (`hung_up` is not needed).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections import deque
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.proxy.faults import DirectionPlan, FaultPlan, count
from trioanubis.proxy.relay import CHUNK_SIZE, Relay, _send

if TYPE_CHECKING:
    from trioanubis.pool import Server

# Bytes one direction may hold (queued or being sent): the fast path's bound.
QUEUE_BOUND: Final = CHUNK_SIZE
# A bandwidth limit is paced in steps of 1/20 s: smooth enough for a client to
# see a steady rate, few enough wake-ups to cost nothing.
PACING_STEPS: Final = 20
# Tiny slices without a delay yield to other tasks this often.
SLICES_PER_CHECKPOINT: Final = 64
# Before a reset, how long the kernel gets to send what precedes the cut.
DRAIN_LIMIT: Final = 2.0
_DRAIN_POLL: Final = 0.001


def relay_faulted(relay: Relay, plan: FaultPlan, nursery: trio.Nursery) -> None:
    """Relay `relay`'s connection under `plan`: four tasks in the connection's `nursery`.

    The nursery exits when both directions ended (EOF both ways) or the relay
    was finished (a reset, a cut, the Timer); the caller closes the sockets.
    """
    server = relay.server
    assert server is not None and relay.server_record is not None
    relay.poller.register(relay.client_fd)  # the server socket joined it to connect
    relay.scope = nursery.cancel_scope
    if plan.upstream.slice or plan.downstream.slice:  # tiny segments must leave as they are
        with contextlib.suppress(OSError):
            relay.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for direction in (_Direction(relay, relay.client, server, True, plan.upstream),
                      _Direction(relay, server, relay.client, False, plan.downstream)):  # fmt: skip
        nursery.start_soon(direction.read)
        nursery.start_soon(direction.send)


def _recv(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes, b"" at EOF, None when there is nothing yet (EAGAIN); OSError otherwise."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None


@final
class _Direction:
    """One direction of a faulted connection: its FIFO, its pacing and its byte count."""

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, upstream: bool, plan: DirectionPlan
    ) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.upstream = upstream
        self.plan = plan
        self.queue: deque[tuple[float, bytes]] = deque()  # (due, data); b"" is the EOF
        self.held = 0  # bytes queued or being sent: at most QUEUE_BOUND
        self.delivered = 0
        self.next_send = 0.0  # the token bucket's next free moment (bandwidth)
        self._room = trio.lowlevel.ParkingLot()  # the reader, waiting for the queue to shrink
        self._arrived = trio.lowlevel.ParkingLot()  # the sender, waiting for the queue to fill

    # ---------------------------------------------------------------- reading

    async def read(self) -> None:
        relay, src, src_fd = self.relay, self.src, self.src.fileno()
        while True:
            room = QUEUE_BOUND - self.held
            if room <= 0:
                await self._room.park()
                continue
            try:
                data = _recv(src, room)
            except OSError:
                relay.finish("client_reset" if self.upstream else "server_reset")  # the side we read from
                return
            if data is None:
                await relay.poller.wait_readable(src_fd)
                continue
            relay.active = True
            if data and self.plan.blackhole:
                await trio.lowlevel.checkpoint()  # read and dropped; a flood still yields
                continue
            self._push(data)
            if not data:
                return
            await trio.lowlevel.checkpoint()

    def _push(self, data: bytes) -> None:
        delay = self.plan.delay() if self.plan.latency else 0.0
        self.queue.append((trio.current_time() + delay if delay else 0.0, data))
        self._hold(len(data))
        self._arrived.unpark_all()

    def _hold(self, change: int) -> None:
        """Count bytes in (or out of) this direction's queue; the relay's `pending_*` shows them."""
        self.held += change
        if self.upstream:
            self.relay.pending_in = self.held
        else:
            self.relay.pending_out = self.held

    # ---------------------------------------------------------------- sending

    async def send(self) -> None:
        relay = self.relay
        while True:
            if not self.queue:
                await self._arrived.park()
                continue
            due, data = self.queue[0]
            if due and due > trio.current_time():
                await trio.sleep_until(due)
            self.queue.popleft()
            if not data:
                relay.on_eof(self.dst, self.upstream, forward=not self.plan.blackhole)
                return
            delivered = await self._deliver(memoryview(data))
            self._hold(-len(data))
            self._room.unpark_all()
            if not delivered:
                return

    async def _deliver(self, view: memoryview) -> bool:
        """Send one chunk in slices, paced, up to the cut; False when the connection ends here."""
        plan = self.plan
        pieces = 0
        while view:
            piece = len(view)
            if plan.slice:
                piece = min(piece, plan.slice)
            if plan.bandwidth:
                piece = min(piece, max(1, plan.bandwidth // PACING_STEPS))
                await self._pace(piece)
            if plan.limit:
                piece = min(piece, plan.limit - self.delivered)
            if not await self._send_all(view[:piece]):
                return False
            self.delivered += piece
            view = view[piece:]
            if plan.limit and self.delivered >= plan.limit:
                await self._cut()
                return False
            if plan.slice and view:
                pieces += 1
                if plan.slice_delay:
                    await trio.sleep(plan.slice_delay)
                elif pieces % SLICES_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()
        return True

    async def _pace(self, size: int) -> None:
        """The token bucket: wait until `size` more bytes keep the rate."""
        now = trio.current_time()
        if self.next_send > now:
            await trio.sleep_until(self.next_send)
        self.next_send = max(self.next_send, now) + size / self.plan.bandwidth

    async def _send_all(self, view: memoryview) -> bool:
        relay, dst, dst_fd = self.relay, self.dst, self.dst.fileno()
        while view:
            try:
                sent = _send(dst, view)
            except OSError:
                relay.finish("server_reset" if self.upstream else "client_reset")  # the side we write to
                return False
            if not sent:
                await relay.poller.wait_writable(dst_fd)
                continue
            view = view[sent:]
            relay.active = True
            if self.upstream:
                if not relay.first_sent:
                    relay.first_sent = relay.poller.now()
                relay.bytes_in += sent
            else:
                if not relay.bytes_out and relay.first_sent and relay.pool is not None:
                    relay.record_first_byte(relay.poller.now())  # least_time sees injected latency
                relay.bytes_out += sent
        return True

    async def _cut(self) -> None:
        """`reset_after` / `close_after` reached: end the connection the way the plan says."""
        end = self.plan.cut
        server: Server | None = self.relay.server_record
        if server is not None:
            count(server, "reset_after" if end == "fault_reset" else "close_after")
        if end == "fault_reset":
            # A reset drops what the kernel still holds: let it send the bytes before the cut.
            with trio.move_on_after(DRAIN_LIMIT):
                while _unsent(self.dst):
                    await trio.sleep(_DRAIN_POLL)
            self.relay.finish("fault_reset")
        else:
            self.relay.finish("fault_close")


def _unsent(sock: socket.socket) -> bool:
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
