"""The socket relay: both directions of one plain connection, moved by one task.

Theory of operation: a connection with no TLS and no filter (the plain path),
or whose one filter only copies the client's bytes (a mirror: its `Tap`),
is relayed here, between its two non-blocking sockets. The `Relay` is a
`Flow` (lifecycle.py: the accounting every relay shape shares, and the
Timer's view of activity); each direction is a `Direction` (client → server
is `up`, server → client `down`, its `way` says which), a small state machine
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
  `Direction.hung_up`), so a busy connection costs one syscall per chunk.
- Every direction reads into its relay's scratch buffer (`Scratch`, one per
  readiness backend, so two balancers in one process share nothing) and
  sends from it before anything else runs, which is safe because Trio runs
  one task at a time. Only the bytes the peer did not accept yet are copied
  out, into a buffer the direction owns until they are sent. So an idle
  connection holds no buffer, and a blocked one holds at most one chunk per
  direction: a direction reads again only after the previous chunk is sent
  (backpressure).
- A direction whose read fills a whole chunk is bulk: where the backend
  offers it (`caps.splice`, epoll), it switches to splice(2) through a pipe
  of its own (256 KiB), so its bytes never enter the process; the pipe,
  emptied before the next read, is then the bound.
- What moved, EOFs and failures are counted and judged by the `Flow`: EOF
  from one side shuts down writing towards the other side and ends that
  direction; the other keeps flowing (half-close). When both directions have
  seen EOF the connection ends normally; the second EOF is passed on by the
  close that follows at once (its FIN), not by a shutdown of its own. A
  client's first EOF is passed on at once (a server waits for it, to answer
  or to close); the backend says when a server's is (`pass_eof`): epoll
  after its next batch of events, so that a client that closes right after
  the answer (`Connection: close`) makes its EOF the second one, and one
  close sends both FINs, as HAProxy's later pass does. A
  reset or error on either socket ends the connection at once, naming that
  side; it then closes both sockets with a reset, so a peer never takes a
  cut for a complete transfer.
- The connection stops a running relay (`stop`) when it decided its end
  (the Timer's idle timeout, a stop): every direction is then `OVER`.
- The client's bytes read before connecting (connection.py's `read_early`) are
  the up direction's first chunk: counted and tapped by `run`, and held
  (`unsent`) until the backend sends them (`send_held`): epoll in its next
  batch, with the other connections' (see proxy/io/epoll.py).
- A `Tap` (a mirror, mirror.py) gets a copy of each chunk read from the
  client, before it is sent on, the client's EOF, and the relay's end. It
  never waits (it keeps or sends its copy at once, or drops it), so the
  relay stays what it is; only the client → server direction copies
  instead of splicing while the tap takes copies. A tap that wants no
  more (its copy dropped: the mirror lags, refused or broke) is let go at
  its next chunk, and the direction may splice again from then on.

Sockets are stdlib sockets in non-blocking mode; this module never closes
them (the connection that opened them does, once `run` returned, so nothing
waits on them any more); it closes the splice pipes it opened, once the
backend stops driving it (`stopped`).
"""

from __future__ import annotations

import _socket
import os
import socket
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from trioanubis.proxy.io.base import AGAIN, CHUNK_SIZE, OVER, READ, WRITE
from trioanubis.proxy.io.sockcalls import recv_into, send
from trioanubis.proxy.lifecycle import DOWN, UP, Counted, Flow, Way

if TYPE_CHECKING:
    import trio

    from trioanubis.proxy.io.base import Readiness as Poller
    from trioanubis.proxy.lifecycle import Connection

# A direction that never finds its socket empty stops (`AGAIN`) after this
# many full chunks, so other connections and cancellation get a turn.
FULL_READS_PER_CHECKPOINT: Final = 16

# Bulk transfers move through a pipe with splice(2), never copied into the
# process (HAProxy's splice-auto). A direction switches once a read fills a
# whole chunk; the pipe then holds what the receiver has not taken, so it is
# the backpressure bound instead of the chunk.
# Only where the readiness backend offers it (epoll: Linux); tests turn it off
# to exercise copying (not `Final`, which the compiled build would fold into its code).
USE_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# Pipe capacity asked for when a direction switches to splice: 256 KiB moves a
# bulk stream in a quarter of the splice calls of the default 64 KiB; it is
# also the most held per direction.
PIPE_SIZE: Final = 262144
# What a pipe holds when the kernel refuses PIPE_SIZE (above /proc/sys/fs/pipe-max-size).
DEFAULT_PIPE_SIZE: Final = 65536

# What one read-and-send found (`Relay._move`).
EMPTY: Final = 0  # nothing to read (EAGAIN)
DRAINED: Final = 1  # a short read, all of it sent: the socket is drained
FULL: Final = 2  # a whole chunk read and sent: more may be waiting
BLOCKED: Final = 3  # the peer took part of the chunk; the rest is in `Direction.unsent`
DONE: Final = 4  # EOF or an error; this direction is over (already handled)

_NOTHING: Final = memoryview(b"")


# The steps' system calls (proxy/io/sockcalls.py: the C helper where it was built, else the socket
# methods), as module constants (in the compiled build a native load, not a lookup by name).
# EAGAIN comes back as a number: an exception raised through a coroutine's frame would make Python
# build a frame object that the coroutine then keeps (about 300 bytes per connection).
_recv_into: Final = recv_into  # (sock, fd, buffer): bytes read, 0 at EOF, -1 for EAGAIN
_send: Final = send  # (sock, fd, buffer, count): bytes sent, 0 for EAGAIN


def open_pipe() -> tuple[int, int, int] | None:
    """A non-blocking pipe for splice, as large as allowed: (read end, write end, capacity).

    None when no pipe can be had (out of descriptors): the relay keeps copying.
    Only called where splice exists (Linux), so fcntl is imported here.
    """
    import fcntl

    try:
        pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size: keep the default
        size = DEFAULT_PIPE_SIZE
    return pipe_out, pipe_in, size


class Tap(Protocol):
    """What takes a copy of a relay's client → server bytes as they pass (mirror.py's `MirrorFilter`).

    Called from the relay's steps, so nothing here waits: a tap keeps or sends
    its copy at once, or drops it (the primary never waits for it).
    """

    def begin(self, nursery: trio.Nursery) -> None:
        """Start what makes the copy (a task in `nursery`, which may outlive the relay)."""

    def tap(self, data: memoryview) -> bool:
        """The next chunk (the relay's buffer, valid during the call only: what the tap keeps, it
        copies); False once it wants no more (its copy dropped)."""
        ...

    def tap_eof(self) -> None:
        """The client sent EOF, after every chunk tapped."""

    def relay_ended(self) -> None:
        """The relay is over (the connection's end decided, or about to be: a stop)."""


@final
class Direction(Counted):
    """One direction of a relay: its sockets, what it waits for, what it holds, what it moved."""

    __slots__ = ("dst", "dst_fd", "hung_up", "pipe_in", "pipe_out", "pipe_size", "piped", "splice", "src",
                 "src_fd", "unsent", "wants")  # fmt: skip

    def __init__(
        self, way: Way, src: _socket.socket, dst: _socket.socket, src_fd: int, dst_fd: int, splice: bool
    ) -> None:
        super().__init__(way)
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src_fd, dst_fd
        self.wants = AGAIN  # nothing tried yet: the first `advance` reads
        self.unsent = _NOTHING  # what the peer did not take of the last chunk, until sent
        self.splice = splice  # may switch to splice once bulk
        self.hung_up = False  # the poller saw the source's FIN or error (`Relay.hang_up`)
        self.pipe_out = self.pipe_in = -1  # the splice pipe, once bulk
        self.pipe_size = 0
        self.piped = 0  # bytes in the pipe, not yet sent on

    @property
    def held(self) -> int:
        """Bytes read and not yet taken by the receiver (in the pipe, or the unsent rest of a chunk)."""
        return self.piped if self.pipe_in >= 0 else len(self.unsent)


@final
class Relay(Flow[Direction]):
    """One plain connection's relay: both sockets and both directions (the counters are the Flow's)."""

    __slots__ = ("client", "client_fd", "driver", "poller", "server", "server_fd", "spliced", "tap")

    def __init__(
        self, conn: Connection, client: _socket.socket, server: _socket.socket, poller: Poller,
        tap: Tap | None = None,
    ) -> None:
        super().__init__(conn)
        self.client = client
        self.server = server
        self.client_fd = client.fileno()
        self.server_fd = server.fileno()
        self.poller = poller
        self.spliced = 0  # directions that switched to splice (bulk)
        self.driver: Any = None  # the readiness backend's own state while it drives this relay
        self.tap = tap  # what copies the client's bytes (a mirror), until its copy is dropped

    def run(self) -> Awaitable[None]:
        """Relay until both sides sent EOF or one failed (or the connection stops it); `await relay.run()`.

        A plain function that prepares the directions and returns the
        backend's `drive` itself, so the connection's task awaits the backend
        with no frame of ours in between (an idle connection's frames are a
        good part of its memory). The caller then closes both sockets; the
        splice pipes are closed when the backend stops driving the relay (`stopped`).
        """
        poller = self.poller
        splice = USE_SPLICE and poller.caps.splice
        client, server, client_fd, server_fd = self.client, self.server, self.client_fd, self.server_fd
        # The descriptors' int objects are shared, not one per direction (above 256 each is an object).
        # A tapped direction copies (spliced bytes never enter the process) until its tap lets go.
        self.up = Direction(UP, client, server, client_fd, server_fd, splice and self.tap is None)
        self.down = Direction(DOWN, server, client, server_fd, client_fd, splice)
        early = self.conn.early
        if early:
            self.conn.early = b""
            self._take_early(self.up, early)
        return poller.drive(self)  # the server socket joined the poller to connect; drive adds the client

    def _take_early(self, direction: Direction, data: bytes) -> None:
        """The client's bytes read before connecting (connection.py's `read_early`): the first chunk,
        counted and tapped as any, held as the direction's `unsent` until the backend sends it
        (`send_held`; the portable backend's first `advance`)."""
        self.moved(direction, len(data))
        view = memoryview(data)
        tap = self.tap
        if tap is not None and not tap.tap(view):
            self._let_go(direction)
        direction.unsent = view

    def send_held(self, direction: Direction) -> bool:
        """Send what `direction` holds (the client's early bytes), then wait for its source without
        reading it: the source's socket joined the poller after those bytes were read, and joining
        reports what it holds. True when the task is needed (the relay ended)."""
        if not self.over:
            if self._send_rest(direction):
                direction.wants = READ
            elif not self.over:
                direction.wants = WRITE
                self.poller.want_writable(direction.dst_fd)
        return self.over

    def stop(self) -> None:
        """The connection decided its end: move nothing more, and let `drive` return."""
        self.over = True
        self.poller.wake(self)

    def stopped(self) -> None:
        """The backend stopped driving this relay (ended, raised or cancelled): close its splice pipes,
        tell the tap. Nothing moves from now on (the dispatcher may still hold its early bytes)."""
        self.over = True
        if self.spliced:
            self._close_pipe(self.up)
            self._close_pipe(self.down)
        tap, self.tap = self.tap, None
        if tap is not None:
            tap.relay_ended()

    # ------------------------------------------------------- the backend's calls

    def advance(self, direction: Direction) -> int:
        """Move one direction as far as it goes without waiting; what it waits for next."""
        if self.over:
            wants = OVER
        elif direction.pipe_in >= 0:
            wants = self._splice(direction)
        else:
            wants = self._copy(direction)
        if wants == OVER and direction.pipe_in >= 0:
            self._close_pipe(direction)
        elif wants == WRITE:
            self.poller.want_writable(direction.dst_fd)
        direction.wants = wants
        return wants

    def hang_up(self, fd: int) -> None:
        """The poller saw `fd`'s peer close or fail (epoll: EPOLLRDHUP, EPOLLHUP or EPOLLERR): a short
        read from it is followed by another, which finds the EOF or the error queued behind the bytes.
        Kept on the direction, where the copy reads it, instead of the poller's set (`hung_up`): a set
        lookup at every short read was a twentieth of a keep-alive request's cost."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        if fd == up.src_fd:
            up.hung_up = True
        elif fd == down.src_fd:
            down.hung_up = True

    def ready(self, fd: int, readable: bool, writable: bool) -> bool:
        """`fd` (one of ours) reported readiness: advance what waited for it; True to wake the task.

        The task is needed once the relay ended or a direction stopped for fairness.
        """
        up, down = self.up, self.down
        assert up is not None and down is not None
        if self.over:
            return True
        # Each direction in turn, written out: a loop over (up, down) builds and iterates a tuple
        # generically in the compiled build, for every event.
        if self._waits_for(up, fd, readable, writable):
            self.advance(up)
        if not self.over and self._waits_for(down, fd, readable, writable):
            self.advance(down)
        return self.over or up.wants == AGAIN or down.wants == AGAIN

    @staticmethod
    def _waits_for(direction: Direction, fd: int, readable: bool, writable: bool) -> bool:
        """`direction` waits for what `fd` reported: to read its source, or to write its destination."""
        wants = direction.wants
        return (wants == READ and readable and fd == direction.src_fd) or (
            wants == WRITE and writable and fd == direction.dst_fd
        )

    def resume(self) -> bool:
        """Advance the directions that stopped for fairness (both, at first); True if one stopped again."""
        up, down = self.up, self.down
        assert up is not None and down is not None
        again = False
        if up.wants == AGAIN:
            again = self.advance(up) == AGAIN
        if down.wants == AGAIN:
            again = self.advance(down) == AGAIN or again
        return again and not self.over

    # ------------------------------------------------------------ copying

    def _copy(self, direction: Direction) -> int:
        if direction.unsent and not self._send_rest(direction):
            return OVER if self.over else WRITE
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
                if not direction.hung_up:  # else a FIN or error may be queued behind: read on
                    return READ
            elif state == EMPTY:
                return READ
            elif state == BLOCKED:
                return WRITE
            else:
                return OVER

    def _move(self, direction: Direction) -> int:
        """Read one chunk from the direction's source and send it on; what happened.

        EAGAIN is a return value here (see `_recv_into`): an exception would leave a frame behind.
        """
        scratch = self.poller.scratch  # the backend's read buffer (one task runs at a time)
        try:
            received = _recv_into(direction.src, direction.src_fd, scratch)
        except OSError:
            self.failed(direction.way, reading=True)
            return DONE
        if received <= 0:
            if received:
                return EMPTY
            self._on_eof(direction)
            return DONE
        self.moved(direction, received)
        tap = self.tap
        if tap is not None and direction is self.up and not tap.tap(scratch[:received]):
            self._let_go(direction)
        try:
            sent = _send(direction.dst, direction.dst_fd, scratch, received)
        except OSError:
            self.failed(direction.way, reading=False)
            return DONE
        if sent < received:
            # The one chunk this direction may hold, until the peer takes it.
            direction.unsent = memoryview(bytes(scratch[sent:received]))
            return BLOCKED
        return DRAINED if received < CHUNK_SIZE else FULL

    def _let_go(self, direction: Direction) -> None:
        """The tap wants no more: forget it; the direction is as any from now on (it may splice)."""
        self.tap = None
        direction.splice = USE_SPLICE and self.poller.caps.splice and direction.pipe_in < 0

    def _send_rest(self, direction: Direction) -> bool:
        """Send what the peer did not take yet; False while some is left (or the relay ended)."""
        view = direction.unsent
        while view:
            try:
                sent = _send(direction.dst, direction.dst_fd, view, len(view))
            except OSError:
                self.failed(direction.way, reading=False)
                return False
            if not sent:
                direction.unsent = view
                return False
            view = view[sent:]
            self.active = True
        direction.unsent = _NOTHING
        return True

    # ------------------------------------------------------------ splicing

    def _open_pipe(self, direction: Direction) -> bool:
        """Switch a bulk direction to splice; False (and copying from now on) when no pipe can be had."""
        direction.splice = False
        pipe = open_pipe()
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
        moves = 0
        while True:
            while direction.piped:
                try:
                    direction.piped -= os.splice(direction.pipe_out, direction.dst_fd, direction.piped,
                                                 flags=_SPLICE_FLAGS)  # fmt: skip
                except BlockingIOError:
                    return WRITE
                except OSError:
                    self.failed(direction.way, reading=False)
                    return OVER
            if moves >= FULL_READS_PER_CHECKPOINT:
                return AGAIN
            try:
                moved = os.splice(direction.src_fd, direction.pipe_in, direction.pipe_size,
                                  flags=_SPLICE_FLAGS)  # fmt: skip
            except BlockingIOError:
                return READ
            except OSError:
                self.failed(direction.way, reading=True)
                return OVER
            if not moved:
                self._on_eof(direction)
                return OVER
            self.moved(direction, moved)
            direction.piped = moved
            moves += 1

    def _close_pipe(self, direction: Direction | None) -> None:
        if direction is not None and direction.pipe_in >= 0:
            os.close(direction.pipe_in)
            os.close(direction.pipe_out)
            direction.pipe_in = direction.pipe_out = -1
            direction.piped = 0

    # ------------------------------------------------------------ ends

    def _on_eof(self, direction: Direction) -> None:
        """EOF from the direction's source: pass it on, unless it was the second (the end).

        After the second, the connection closes both sockets, which sends the
        destination its FIN (as HAProxy does): no shutdown first. The
        destination sent EOF already, so nothing unread makes that close a reset.
        """
        if self.tap is not None and direction is self.up:
            self.tap.tap_eof()
        if self.eof(direction.way):
            return
        if direction is self.up:  # a server waits for the client's EOF as a rule: pass it on now
            self.forward_eof(direction)
        else:  # the client may close once it has the answer: then one close sends both FINs
            self.poller.pass_eof(self, direction)

    def forward_eof(self, direction: Direction) -> None:
        """Pass the first EOF on (the backend calls this, now or after its next batch of events):
        shut down writing towards the direction's destination, unless the connection ended
        meanwhile (the close that follows sends the FIN, or resets)."""
        if self.conn.end:
            return
        try:
            direction.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.failed(direction.way, reading=False)

