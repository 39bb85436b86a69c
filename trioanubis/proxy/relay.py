"""The relay: two pumps moving bytes between a client and a server socket.

Theory of operation: one `Relay` per connection holds both sockets, the
counters of both directions and the connection's timeout state (which the
process-wide `Timer` in timeouts.py checks). The connection opens its own
nursery; `start()` runs the server → client pump as its child task and
`upstream()`, the client → server pump, runs in the nursery's body, so a
connection costs two tasks.

- A pump calls the non-blocking `recv_into` / `send` first and waits for
  readiness only when the kernel says EAGAIN (or a short read shows the
  socket drained), so a busy connection costs one syscall per chunk. Waits go
  through the process's readiness backend (proxy/io/): on Linux its epoll,
  where both sockets were registered once, edge-triggered, instead of
  re-arming Trio's epoll per wait; elsewhere Trio's own waits.
- A pump parked on a drained socket lets the poller's dispatcher take its
  next step (`step`: one read and one send, the same `_move` the pump runs)
  without waking it; the pump wakes only for what a step cannot finish: EOF
  or an error, a partial send, a full chunk. A request/response exchange
  then costs no task switch at all, and the task still owns its direction:
  cancelling it stops the steps, and a bug in one ends only its connection.
- Every pump reads into one process-wide scratch buffer and sends from it
  before its next checkpoint, which is safe because Trio runs one task at a
  time. Only the bytes the peer did not accept yet are copied out, into a
  buffer the pump owns until they are sent. So an idle connection holds no
  buffer, and a blocked one holds at most one chunk per direction: a pump
  reads again only after the previous chunk is sent (backpressure).
- A direction whose read fills a whole chunk is bulk: where the backend
  offers it (epoll), it switches to splice(2) through a pipe of its own
  (256 KiB), so its bytes never enter the process; the pipe, emptied before
  the next read, is then the bound.
- EOF from one side shuts down writing towards the other side and ends that
  pump; the other direction keeps flowing (half-close). When both pumps have
  seen EOF the relay ends normally.
- A reset or error on either socket ends the whole relay at once: the pump
  records why (`end`) and cancels the nursery; the caller closes both sockets,
  with a reset (`reset_on_close`) unless both sides ended cleanly, so a peer
  never takes a cut for a complete transfer.
- Every chunk sets `active` (no clock read per chunk); the Timer turns that
  into `last_activity` on its next tick and ends a relay that moved no byte
  either way for `idle_timeout` (or the shorter `half_close_timeout` once
  one side has sent EOF) with `end = "idle_timeout"`.

Sockets are stdlib sockets in non-blocking mode; this module never closes
them (the connection that opened them does, after the nursery has exited, so
no task is waiting on them any more).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Final, Literal, final

import trio

if TYPE_CHECKING:
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.connect import Connecting
    from trioanubis.proxy.io import Readiness as Poller
    from trioanubis.proxy.record import EndState, FirstEof

# One read's worth of bytes; also the most a pump ever holds while its peer
# is not reading (per direction). 64 KiB is the size where loopback
# throughput stops improving with bigger reads.
CHUNK_SIZE: Final = 65536

# A pump that never finds its socket empty checkpoints after this many full
# chunks, so other connections and cancellation get a turn.
FULL_READS_PER_CHECKPOINT: Final = 16

# Bulk transfers move through a pipe with splice(2), never copied into the
# process (HAProxy's splice-auto). A direction switches once a read fills a
# whole chunk; the pipe then holds what the receiver has not taken, so it is
# the backpressure bound instead of the chunk.
# Only where the readiness backend offers it (epoll: Linux); tests turn it off
# to exercise copying.
USE_SPLICE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# What one step of a pump found (`Relay._move`).
EMPTY: Final = 0  # nothing to read (EAGAIN)
DRAINED: Final = 1  # a short read, all of it sent: the socket is drained
FULL: Final = 2  # a whole chunk read and sent: more may be waiting
BLOCKED: Final = 3  # the peer took part of the chunk; the rest is in unsent_in / unsent_out
DONE: Final = 4  # EOF or an error; this direction is over (already handled)

_scratch = bytearray(CHUNK_SIZE)
_SCRATCH: Final = memoryview(_scratch)

# A constant task name: Trio would otherwise format one string per task.
_PUMP_TASK_NAME: Final = "trioanubis.relay.server_to_client"

_checkpoint = trio.lowlevel.checkpoint

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
    coroutines here meet EAGAIN as a return value of a plain function like
    this one or `Relay._move`. For the same reason they wait outside `except`
    blocks: a task parked inside one keeps the exception alive.
    """
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


@final
class Relay:
    """One proxied connection: both sockets, what moved, and how it ended."""

    __slots__ = (
        "active", "bytes_in", "bytes_out", "client",
        "client_fd", "connecting", "end", "first_eof", "first_sent", "half_close_timeout",
        "idle_timeout", "last_activity", "pending_in", "pending_out", "poller", "pool", "scope",
        "server", "server_record", "spliced", "unsent_in", "unsent_out",
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
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.pool = pool  # where first-byte latency samples go (least_time)
        self.server_record: Server | None = None
        self.bytes_in = 0  # client → server
        self.bytes_out = 0  # server → client
        self.pending_in = 0  # bytes read from the client, not yet accepted by the server
        self.pending_out = 0
        self.unsent_in = b""  # what the server did not take of the last chunk, until sent
        self.unsent_out = b""
        self.first_eof: FirstEof = ""  # "client_eof" or "server_eof": the side that sent EOF first
        self.end: EndState | Literal[""] = ""  # why it ended; "" while running or when cut from outside
        self.first_sent = 0.0  # when the first client byte went to the server
        self.last_activity = 0.0  # when the Timer last saw it active (or when it started)
        self.active = False  # moved something since the Timer last looked
        self.spliced = 0  # directions that switched to splice (bulk)
        self.scope: trio.CancelScope | None = None
        self.connecting: Connecting | None = None  # until connected (proxy/connect.py; the Timer checks it)

    def start(self, nursery: trio.Nursery) -> None:
        """Start relaying in the connection's nursery: server → client as its child task.

        The caller then awaits `upstream()` in the nursery's body. The relay ends
        when both sides sent EOF or one side failed (or the Timer ends it);
        cancellation from outside (shutdown) leaves `end` empty.
        """
        assert self.server is not None
        self.last_activity = self.poller.now()
        self.poller.register(self.client_fd)  # the server socket joined it to connect
        self.scope = nursery.cancel_scope
        nursery.start_soon(self._pump, self.server, self.client, False, name=_PUMP_TASK_NAME)

    def upstream(self) -> Coroutine[object, object, None]:
        """The client → server pump, for the body of the nursery given to `start`.

        A plain method returning the pump, so a parked connection carries no frame
        of a `run` wrapper (one frame is about 250 bytes per connection).
        """
        assert self.server is not None
        return self._pump(self.client, self.server, True)

    def finish(self, end: EndState) -> None:
        """End the relay now, recording why (the first reason given wins)."""
        if not self.end:
            self.end = end
        if self.scope is not None:
            self.scope.cancel()

    def _reset(self, *, client: bool) -> None:
        """One side failed (reset or error): end the relay, naming that side."""
        self.finish("client_reset" if client else "server_reset")

    def _move(self, src: socket.socket, dst: socket.socket, upstream: bool) -> int:
        """One step of a pump: read one chunk from `src` and send it to `dst`; what happened.

        The pump takes this step itself, or the poller's dispatcher takes it on
        the parked pump's behalf (`step`); the same code counts the bytes either way.
        A plain function, so EAGAIN raised here leaves nothing behind (see `_send`).
        """
        try:
            received = src.recv_into(_SCRATCH)
        except BlockingIOError:
            return EMPTY
        except OSError:
            self._reset(client=upstream)  # the side we read from
            return DONE
        if not received:
            self.on_eof(dst, upstream)
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
            sent = dst.send(_SCRATCH[:received])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._reset(client=not upstream)  # the side we write to
            return DONE
        if sent < received:
            unsent = bytes(_SCRATCH[sent:received])  # the one chunk this direction may hold
            if upstream:
                self.unsent_in = unsent
            else:
                self.unsent_out = unsent
            return BLOCKED
        return DRAINED if received < CHUNK_SIZE else FULL

    def step(self, fd: int) -> int | None:
        """The dispatcher's turn for a pump parked on `fd`: its next step, or None to stay parked.

        Called only while that pump waits in `_pump` for `fd` to become readable.
        """
        server = self.server
        assert server is not None
        if fd == self.client_fd:
            src, dst, upstream = self.client, server, True
        else:
            src, dst, upstream = server, self.client, False
        state = self._move(src, dst, upstream)
        while state == DRAINED and fd in self.poller.hung_up:  # a FIN or error is queued behind
            state = self._move(src, dst, upstream)
        if state in (EMPTY, DRAINED):
            return None  # the pump stays parked
        return state

    async def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        poller = self.poller
        hung_up = poller.hung_up
        src_fd = src.fileno()
        splice = USE_SPLICE and poller.splice
        full_reads = 0
        state = self._move(src, dst, upstream)
        while True:
            if state == EMPTY or (state == DRAINED and src_fd not in hung_up):
                # Drained (a short read waits rather than paying for an EAGAIN, unless a
                # FIN or reset may be queued behind the data: see proxy/io/epoll.py). While we
                # are parked the dispatcher takes our steps (`step`) and wakes us only
                # with one that needs more than a read and a complete send.
                full_reads = 0
                state = await poller.wait_readable(src_fd, self)
                continue
            if state == DONE:
                return
            if state == BLOCKED:
                if not await self._send_rest(dst, upstream):
                    return
                full_reads = 0
            elif state == DRAINED:  # and hung up: read the FIN (or error) after a checkpoint
                await _checkpoint()
            elif splice and await self._splice(src, dst, upstream):
                return  # FULL, and bulk: splice carried the rest of this direction
            else:
                splice = False  # no pipe could be had: keep copying
                full_reads += 1
                if full_reads >= FULL_READS_PER_CHECKPOINT:
                    await _checkpoint()
                    full_reads = 0
            state = self._move(src, dst, upstream)

    async def _splice(self, src: socket.socket, dst: socket.socket, upstream: bool) -> bool:
        """Relay the rest of one direction socket → pipe → socket, inside the kernel.

        Waits only after EAGAIN (safe with the edge-triggered poller); the pipe is
        emptied into `dst` before anything more is read, so at most one pipe-full
        is held for a slow receiver. False, having done nothing, when no pipe can
        be had (out of descriptors): the caller keeps copying.
        """
        poller = self.poller
        pipe = poller.open_pipe()
        if pipe is None:
            return False
        pipe_out, pipe_in, size = pipe
        src_fd, dst_fd = src.fileno(), dst.fileno()
        moves = 0
        self.spliced += 1
        try:
            while True:
                try:
                    moved = os.splice(src_fd, pipe_in, size, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    moved = -1
                except OSError:
                    self._reset(client=upstream)  # the side we read from
                    return True
                if moved < 0:
                    await poller.wait_readable(src_fd)
                    continue
                if not moved:
                    self.on_eof(dst, upstream)
                    return True
                self.active = True
                if upstream:
                    self.bytes_in += moved
                else:
                    self.bytes_out += moved
                while moved:
                    try:
                        moved -= os.splice(pipe_out, dst_fd, moved, flags=_SPLICE_FLAGS)
                        continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._reset(client=not upstream)  # the side we write to
                        return True
                    self._set_pending(upstream, moved)
                    await poller.wait_writable(dst_fd)
                self._set_pending(upstream, 0)
                moves += 1
                if moves >= FULL_READS_PER_CHECKPOINT:
                    moves = 0
                    await _checkpoint()
        finally:
            self._set_pending(upstream, 0)
            os.close(pipe_in)
            os.close(pipe_out)

    async def _send_rest(self, dst: socket.socket, upstream: bool) -> bool:
        """Send what the peer did not take at once; False when the relay ended meanwhile."""
        if upstream:
            data, self.unsent_in = self.unsent_in, b""
        else:
            data, self.unsent_out = self.unsent_out, b""
        view = memoryview(data)
        dst_fd = dst.fileno()
        try:
            while view:
                self._set_pending(upstream, len(view))
                await self.poller.wait_writable(dst_fd)
                try:
                    sent = _send(dst, view)
                except OSError:
                    self._reset(client=not upstream)  # the side we write to
                    return False
                view = view[sent:]
                self.active = True
        finally:
            self._set_pending(upstream, 0)
        return True

    def _set_pending(self, upstream: bool, count: int) -> None:
        if upstream:
            self.pending_in = count
        else:
            self.pending_out = count

    def on_eof(self, dst: socket.socket, upstream: bool, *, forward: bool = True) -> None:
        """EOF from one side: pass it on to `dst` (unless a blackhole swallows it: `forward`)."""
        both = bool(self.first_eof)  # the other side's EOF came first
        if not both:
            self.first_eof = "client_eof" if upstream else "server_eof"
        self.active = True
        try:
            if forward:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset(client=not upstream)  # the side we write to
            return
        if both:
            self.end = self.first_eof

    def record_first_byte(self, now: float) -> None:
        assert self.pool is not None and self.server_record is not None
        if self.pool.config.least_time == "first_byte":
            self.pool.record_time(self.server_record, now - self.first_sent)
