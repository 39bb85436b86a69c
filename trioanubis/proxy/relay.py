"""The relay: both directions of one connection, moved by one task.

Theory of operation: one `Relay` per connection holds both sockets, the
counters of both directions and the connection's timeout state (which the
process-wide `Timer` in timeouts.py checks). Each direction is a `Direction`
(client → server is `up`, server → client `down`), a small state machine
that `advance` moves as far as it goes without waiting and leaves with what
it waits for next (`wants`): its source to become readable (`READ`), its
destination to take more (`WRITE`), a turn of the loop because it stopped
for fairness with more to read (`AGAIN`), or nothing (`OVER`). Nothing in a
direction awaits, so who calls `advance` is the readiness backend's choice
(proxy/io/), and `run` hands the relay to it (`Readiness.drive`):

- epoll: the connection's own task is the only task. Both sockets are owned
  by the relay in the poller; the dispatcher advances a direction when its
  socket reports what the direction waits for (`ready`), and wakes the task
  only for what a step cannot finish: the relay ended (both EOFs, a reset,
  the Timer), a direction stopped for fairness, or a step raised. An
  exchange of messages then costs a `recv` and a `send` each and no task
  switch, and an idle connection is one task parked once for both sockets,
  with no nursery of its own.
- portable: the direction's own loop waits with Trio's waits, one task per
  direction in a nursery of the connection's.

Either way the task stays the owner: cancelling it (or the connections
nursery) stops the relay and the connection closes both sockets; an
exception from a step is raised in that task and ends only its connection.

- A direction calls the non-blocking `recv_into` / `send` first and waits
  for readiness only when the kernel says EAGAIN (or a short read shows the
  socket drained, unless the poller saw a FIN or error behind the data:
  `hung_up`), so a busy connection costs one syscall per chunk.
- Every direction reads into one process-wide scratch buffer and sends from
  it before anything else runs, which is safe because Trio runs one task at
  a time. Only the bytes the peer did not accept yet are copied out, into a
  buffer the direction owns until they are sent. So an idle connection holds
  no buffer, and a blocked one holds at most one chunk per direction: a
  direction reads again only after the previous chunk is sent (backpressure).
- A direction whose read fills a whole chunk is bulk: where the backend
  offers it (epoll), it switches to splice(2) through a pipe of its own
  (256 KiB), so its bytes never enter the process; the pipe, emptied before
  the next read, is then the bound.
- EOF from one side shuts down writing towards the other side and ends that
  direction; the other keeps flowing (half-close). When both directions
  have seen EOF the relay ends normally; the second EOF is passed on by the
  close that follows at once (its FIN), not by a shutdown of its own.
- A reset or error on either socket ends the whole relay at once (`finish`,
  recording why in `end`); the caller closes both sockets, with a reset
  (`reset_on_close`) unless both sides ended cleanly, so a peer never takes
  a cut for a complete transfer.
- Every chunk sets `active` (no clock read per chunk), and so does the end
  of connecting (connection.py); the Timer turns that into `last_activity`
  (its tick's time, one float for all) on its next look and ends a relay
  that moved no byte either way for `idle_timeout` (or the shorter
  `half_close_timeout` once one side has sent EOF) with `end = "idle_timeout"`.

Sockets are stdlib sockets in non-blocking mode; this module never closes
them (the connection that opened them does, once `run` returned, so nothing
waits on them any more); it closes the splice pipes it opened, once the
backend stops driving it (`stopped`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Literal, final

import trio

from trioanubis.proxy.io.base import AGAIN, OVER, READ, WRITE

if TYPE_CHECKING:
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.connect import Connecting
    from trioanubis.proxy.io import Readiness as Poller
    from trioanubis.proxy.record import EndState, FirstEof

# One read's worth of bytes; also the most a direction ever holds while its
# peer is not reading. 64 KiB is the size where loopback throughput stops
# improving with bigger reads.
CHUNK_SIZE: Final = 65536

# A direction that never finds its socket empty stops (`AGAIN`) after this
# many full chunks, so other connections and cancellation get a turn.
FULL_READS_PER_CHECKPOINT: Final = 16

# Bulk transfers move through a pipe with splice(2), never copied into the
# process (HAProxy's splice-auto). A direction switches once a read fills a
# whole chunk; the pipe then holds what the receiver has not taken, so it is
# the backpressure bound instead of the chunk.
# Only where the readiness backend offers it (epoll: Linux); tests turn it off
# to exercise copying.
USE_SPLICE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# What one read-and-send found (`Relay._move`).
EMPTY: Final = 0  # nothing to read (EAGAIN)
DRAINED: Final = 1  # a short read, all of it sent: the socket is drained
FULL: Final = 2  # a whole chunk read and sent: more may be waiting
BLOCKED: Final = 3  # the peer took part of the chunk; the rest is in `Direction.unsent`
DONE: Final = 4  # EOF or an error; this direction is over (already handled)

_scratch = bytearray(CHUNK_SIZE)
_SCRATCH: Final = memoryview(_scratch)
_NOTHING: Final = memoryview(b"")

# SO_LINGER on, with a zero timeout: close() sends a reset and drops unsent bytes.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make the coming close of `sock` send a TCP reset instead of FIN (HAProxy's nolinger).

    For a connection that did not end cleanly: a peer's reset, a timeout, a
    stop. A socket the peer already reset has nothing left to send; that is fine.
    """
    with contextlib.suppress(OSError):  # already failed: the close that follows is all there is
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _send(sock: socket.socket, data: memoryview) -> int:
    """`sock.send(data)`, or 0 when the peer's buffer is full (EAGAIN).

    An exception raised through a coroutine's frame makes Python build a frame
    object that the coroutine then keeps (about 300 bytes per connection), so
    coroutines meet EAGAIN as a return value of a plain function like this one.
    """
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


@final
class Direction:
    """One direction of a relay: its sockets, what it waits for, what it holds."""

    __slots__ = ("dst", "dst_fd", "pipe_in", "pipe_out", "pipe_size", "piped", "splice", "src", "src_fd",
                 "unsent", "upstream", "wants")  # fmt: skip

    def __init__(
        self, src: socket.socket, dst: socket.socket, src_fd: int, dst_fd: int, upstream: bool, splice: bool
    ) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.upstream = upstream  # client → server
        self.wants = AGAIN  # nothing tried yet: the first `advance` reads
        self.unsent = _NOTHING  # what the peer did not take of the last chunk, until sent
        self.splice = splice  # may switch to splice once bulk
        self.pipe_out = self.pipe_in = -1  # the splice pipe, once bulk
        self.pipe_size = 0
        self.piped = 0  # bytes in the pipe, not yet sent on


@final
class Relay:
    """One proxied connection: both sockets, what moved, and how it ended."""

    __slots__ = (
        "active", "bytes_in", "bytes_out", "client", "client_fd", "connecting", "down", "end", "error",
        "first_eof", "first_sent", "half_close_timeout", "idle_timeout", "last_activity", "parked",
        "pending_in", "pending_out", "poller", "pool", "scope", "server", "server_fd", "server_record",
        "spliced", "up",
    )  # fmt: skip

    def __init__(
        self,
        client: socket.socket,
        *,
        idle_timeout: float,
        half_close_timeout: float,
        poller: Poller,
        pool: Pool | None = None,
    ) -> None:
        self.client = client
        self.client_fd = client.fileno()
        self.poller = poller
        self.server: socket.socket | None = None
        self.server_fd = -1
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.pool = pool  # where first-byte latency samples go (least_time)
        self.server_record: Server | None = None
        self.bytes_in = 0  # client → server
        self.bytes_out = 0  # server → client
        self.pending_in = 0  # bytes read from the client, not yet accepted by the server
        self.pending_out = 0
        self.first_eof: FirstEof = ""  # "client_eof" or "server_eof": the side that sent EOF first
        self.end: EndState | Literal[""] = ""  # why it ended; "" while running or when cut from outside
        self.error: Exception | None = None  # what a step raised, for the connection's task to raise
        self.first_sent = 0.0  # when the first client byte went to the server
        self.last_activity = 0.0  # when the Timer last saw it active
        self.active = False  # moved something since the Timer last looked (or connected since)
        self.spliced = 0  # directions that switched to splice (bulk)
        # A nursery's scope to cancel when the relay ends: the portable backend's, a
        # faulted or TLS connection's (faulted.py, tls_relay.py); None on epoll.
        self.scope: trio.CancelScope | None = None
        self.parked: Any = None  # the task the epoll backend parked for this relay (its business)
        self.connecting: Connecting | None = None  # until connected (proxy/connect.py; the Timer checks it)
        self.up: Direction | None = None  # set by `run`
        self.down: Direction | None = None

    def run(self) -> Awaitable[None]:
        """Relay until both sides sent EOF or one failed (or the Timer ends it); `await relay.run()`.

        A plain function that prepares the directions and returns the
        backend's `drive` itself, so the connection's task awaits the backend
        with no frame of ours in between (an idle connection's frames are a
        good part of its memory). Cancellation from outside (a stop) leaves
        `end` empty. The caller then closes both sockets; the splice pipes
        are closed when the backend stops driving the relay (`stopped`).
        """
        server = self.server
        assert server is not None
        poller = self.poller
        self.server_fd = server_fd = server.fileno()
        splice = USE_SPLICE and poller.splice
        # The descriptors' int objects are shared, not one per direction (above 256 each is an object).
        self.up = Direction(self.client, server, self.client_fd, server_fd, True, splice)
        self.down = Direction(server, self.client, server_fd, self.client_fd, False, splice)
        poller.register(self.client_fd)  # the server socket joined it to connect
        return poller.drive(self)

    def stopped(self) -> None:
        """The backend stopped driving this relay (ended, raised or cancelled): close its splice pipes."""
        self._close_pipe(self.up)
        self._close_pipe(self.down)

    def finish(self, end: EndState) -> None:
        """End the relay now, recording why (the first reason given wins)."""
        if not self.end:
            self.end = end
        if self.scope is not None:
            self.scope.cancel()
        else:
            self.poller.wake(self)

    def _reset(self, *, client: bool) -> None:
        """One side failed (reset or error): end the relay, naming that side."""
        self.finish("client_reset" if client else "server_reset")

    # ------------------------------------------------------- the backend's calls

    def advance(self, upstream: bool) -> int:
        """Move one direction as far as it goes without waiting; what it waits for next."""
        direction = self.up if upstream else self.down
        assert direction is not None
        if self.end:
            wants = OVER
        elif direction.pipe_in >= 0:
            wants = self._splice(direction)
        else:
            wants = self._copy(direction)
        if wants == OVER and direction.pipe_in >= 0:
            self._close_pipe(direction)
        direction.wants = wants
        return wants

    def ready(self, fd: int, readable: bool, writable: bool) -> bool:
        """`fd` (one of ours) reported readiness: advance what waited for it; True to wake the task.

        The task is needed once the relay ended or a direction stopped for
        fairness. A relay a step broke (`error`) takes no more steps.
        """
        up, down = self.up, self.down
        assert up is not None and down is not None
        for direction in (up, down):
            if self.end or self.error is not None:
                return True
            wants = direction.wants
            if (wants == READ and readable and fd == direction.src_fd) or (
                wants == WRITE and writable and fd == direction.dst_fd
            ):
                self.advance(direction.upstream)
        return bool(self.end) or self.error is not None or up.wants == AGAIN or down.wants == AGAIN

    def resume(self) -> bool:
        """Advance the directions that stopped for fairness (both, at first); True if one stopped again."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        again = False
        if up.wants == AGAIN:
            again = self.advance(True) == AGAIN
        if down.wants == AGAIN:
            again = self.advance(False) == AGAIN or again
        return again and not self.end

    # ------------------------------------------------------------ copying

    def _copy(self, direction: Direction) -> int:
        if direction.unsent and not self._send_rest(direction):
            return OVER if self.end else WRITE
        hung_up = self.poller.hung_up
        full_reads = 0
        while True:
            state = self._move(direction)
            if state == FULL:
                if direction.splice and self._open_pipe(direction):
                    return self._splice(direction)
                full_reads += 1
                if full_reads >= FULL_READS_PER_CHECKPOINT:
                    return AGAIN
            elif state == DRAINED:
                if direction.src_fd not in hung_up:  # a FIN or error may be queued behind: read on
                    return READ
            elif state == EMPTY:
                return READ
            elif state == BLOCKED:
                return WRITE
            else:
                return OVER

    def _move(self, direction: Direction) -> int:
        """Read one chunk from the direction's source and send it on; what happened.

        A plain function, so EAGAIN raised here leaves nothing behind (see `_send`).
        """
        upstream = direction.upstream
        try:
            received = direction.src.recv_into(_SCRATCH)
        except BlockingIOError:
            return EMPTY
        except OSError:
            self._reset(client=upstream)  # the side we read from
            return DONE
        if not received:
            self.on_eof(direction.dst, upstream)
            return DONE
        self.active = True
        if upstream:
            self.bytes_in += received
            if not self.first_sent:
                self.first_sent = self.poller.now()
        else:
            if not self.bytes_out and self.first_sent and self.pool is not None:
                self.record_first_byte(self.poller.now())
            self.bytes_out += received
        try:
            sent = direction.dst.send(_SCRATCH[:received])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._reset(client=not upstream)  # the side we write to
            return DONE
        if sent < received:
            # The one chunk this direction may hold, until the peer takes it.
            direction.unsent = memoryview(bytes(_SCRATCH[sent:received]))
            self._set_pending(upstream, received - sent)
            return BLOCKED
        return DRAINED if received < CHUNK_SIZE else FULL

    def _send_rest(self, direction: Direction) -> bool:
        """Send what the peer did not take yet; False while some is left (or the relay ended)."""
        view, upstream = direction.unsent, direction.upstream
        while view:
            try:
                sent = _send(direction.dst, view)
            except OSError:
                self._reset(client=not upstream)  # the side we write to
                return False
            if not sent:
                direction.unsent = view
                self._set_pending(upstream, len(view))
                return False
            view = view[sent:]
            self.active = True
        direction.unsent = _NOTHING
        self._set_pending(upstream, 0)
        return True

    def _set_pending(self, upstream: bool, count: int) -> None:
        if upstream:
            self.pending_in = count
        else:
            self.pending_out = count

    # ------------------------------------------------------------ splicing

    def _open_pipe(self, direction: Direction) -> bool:
        """Switch a bulk direction to splice; False (and copying from now on) when no pipe can be had."""
        direction.splice = False
        pipe = self.poller.open_pipe()
        if pipe is None:
            return False
        direction.pipe_out, direction.pipe_in, direction.pipe_size = pipe
        self.spliced += 1
        return True

    def _splice(self, direction: Direction) -> int:
        """Relay socket → pipe → socket, inside the kernel, until EAGAIN, EOF or a turn is due.

        The pipe is emptied into the destination before anything more is read,
        so at most one pipe-full is held for a slow receiver.
        """
        upstream = direction.upstream
        moves = 0
        while True:
            while direction.piped:
                try:
                    direction.piped -= os.splice(direction.pipe_out, direction.dst_fd, direction.piped,
                                                 flags=_SPLICE_FLAGS)  # fmt: skip
                except BlockingIOError:
                    self._set_pending(upstream, direction.piped)
                    return WRITE
                except OSError:
                    self._reset(client=not upstream)  # the side we write to
                    return OVER
            self._set_pending(upstream, 0)
            if moves >= FULL_READS_PER_CHECKPOINT:
                return AGAIN
            try:
                moved = os.splice(direction.src_fd, direction.pipe_in, direction.pipe_size,
                                  flags=_SPLICE_FLAGS)  # fmt: skip
            except BlockingIOError:
                return READ
            except OSError:
                self._reset(client=upstream)  # the side we read from
                return OVER
            if not moved:
                self.on_eof(direction.dst, upstream)
                return OVER
            self.active = True
            if upstream:
                self.bytes_in += moved
            else:
                self.bytes_out += moved
            direction.piped = moved
            moves += 1

    def _close_pipe(self, direction: Direction | None) -> None:
        if direction is not None and direction.pipe_in >= 0:
            os.close(direction.pipe_in)
            os.close(direction.pipe_out)
            direction.pipe_in = direction.pipe_out = -1
            direction.piped = 0
            self._set_pending(direction.upstream, 0)

    # ------------------------------------------------------------ ends

    def on_eof(self, dst: socket.socket, upstream: bool, *, forward: bool = True) -> None:
        """EOF from one side: pass it on to `dst` (unless a blackhole swallows it: `forward`)."""
        both = bool(self.first_eof)  # the other side's EOF came first
        if not both:
            self.first_eof = "client_eof" if upstream else "server_eof"
        self.active = True
        if both:
            # The relay ends now and the connection closes both sockets, which sends
            # `dst` its FIN (as HAProxy does): no shutdown first. `dst` sent EOF
            # already, so nothing unread is left to make that close a reset.
            self.end = self.first_eof
            return
        try:
            if forward:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset(client=not upstream)  # the side we write to

    def record_first_byte(self, now: float) -> None:
        assert self.pool is not None and self.server_record is not None
        if self.pool.config.least_time == "first_byte":
            self.pool.record_time(self.server_record, now - self.first_sent)
