"""Mirroring: a copy of a connection's client bytes to a second server, its answers thrown away.

Theory of operation: a pool with `mirror` sends `mirror_percent` of its
connections, drawn one by one (`sampled`), to a mirror as well: a server of
another pool (picked by that pool's strategy among its healthy servers, one
of its slots taken like any connection's), or a fixed "host:port" (resolved
once if it is an IP address, else at most every `RESOLVE_EVERY` seconds).
`mirror_filters` is a maker (makers.py): a connection not sampled, or whose
pool has no mirror, gets nothing and keeps the socket relay and splice; so
does a sampled one whose mirror is known to be down (its pool has no server
up, or its address refused less than `MIRROR_RETRY` ago), its copy counted as
dropped at once: a copy nobody can take is not worth its task and socket.

A sampled connection's client → server direction gets a `MirrorFilter`.
When it is the connection's only filter and both sides are plain TCP, the
connection keeps the socket relay (relay.py), which calls the filter as its
`Tap` from its read path (`tap`, `tap_eof`, `relay_ended`; that direction
copies instead of splicing while the copy lasts, and splices again once it
was dropped); otherwise (TLS, faults, a bandwidth limit) the stream relay
runs it as a filter (`on_read`, `on_eof`, `start`). Either way the same
hooks below do the work, so what follows holds for both.
Its `on_read` keeps each chunk the client sent, in order, in a FIFO bounded
by `MIRROR_BUFFER`, and returns the chunk unchanged: the primary never waits
for the mirror (when the copy's writer is idle, the chunk is offered to the
mirror's socket at once, without waiting, and the writer woken only for
what it did not take). The copy's task connects to the mirror, sends what the
mirror pool expects first (its PROXY header, and the bytes read while
routing), then the FIFO as it fills, the client's EOF as a half-close after
the last byte (`on_eof`), and reads the mirror's answers into a scratch
buffer nobody reads.

The mirror never slows or breaks the primary. When the mirror lags (the
FIFO would overflow), refuses, has no server, resets or fails, its copy is
dropped: the FIFO is emptied, the mirror connection reset, and the drop
counted by reason (`DROP_REASONS`, anubis_mirror_dropped_total); the
primary carries on.

Nor does the mirror hold up the primary's end. The copy's task runs in the
connections nursery, beside the connection's, not in its relay's: a task of
the relay's (`_watch`) only tells it when the primary ended. A short
connection (a request, its answer, a close) is often over before its mirror
has even connected, so after a clean end the copy gets `MIRROR_LINGER` to
send the rest and its FIN and to see the mirror close; after a reset or a
stop the mirror is reset at once, as the primary's server was. Either way
the task's `finally` gives back everything (`_finish`): what is still queued
is sent if the socket takes it at once, what could not be is counted as
`cut`, the socket is closed (FIN or reset, as above), and the mirror pool's
slot is given back with the bytes it moved. The balancer's stop cancels a
lingering copy with the connections nursery. A bug in here is logged and
counted (`internal_error`); it drops the copy, never the primary.

A reload changes what new connections do (the mirror, the share); a
mirrored connection keeps its mirror connection until it ends (a mirror
pool that a reload removed still gives its slot back). Mirror
connections are not mirrored again (a mirror pool's own `mirror` applies to
its own clients only).

Per pool (`PoolMirror`, for /stats and /metrics): connections sampled,
bytes delivered to the mirror, drops by reason.
"""

from __future__ import annotations

import _socket
import contextlib
import logging
import random
import socket
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Final, final

import trio

from trioanubis.config import Address, PoolConfig, ServerConfig, ip_address_or_none
from trioanubis.errors import ConnectFailed, OutOfResources
from trioanubis.pool import PerPool, Server
from trioanubis.proxy.connect import connect_any
from trioanubis.proxy.failover import client_key
from trioanubis.proxy.filters import Filter, Filters
from trioanubis.proxy.io.base import CHUNK_SIZE
from trioanubis.proxy.lifecycle import CLOSED_CLEANLY, normalise_peer
from trioanubis.proxy.proxy_protocol import build_header
from trioanubis.resolve import resolve_address

if TYPE_CHECKING:
    from trioanubis.pool import Pool
    from trioanubis.proxy.lifecycle import Connection

log = logging.getLogger("trioanubis.mirror")

# What one mirrored connection may hold for a mirror that has not taken it yet: four of the relay's
# chunks, besides what the kernel buffers. A mirror further behind is lagging: its copy is dropped.
MIRROR_BUFFER: Final = 4 * CHUNK_SIZE
# A mirror given by host name is looked up again at most this often (IP addresses never).
RESOLVE_EVERY: Final = 30.0
# A mirror address that failed a connect is not tried for this long: the copies sampled meanwhile
# are not attempted (counted as no_server), so a stopped mirror costs new connections nothing. A
# mirror pool needs no such rule: its health checks take a stopped server out. (Not `Final`, which the
# compiled build would fold into its code: a test lengthens it.)
MIRROR_RETRY = 1.0
# Why a copy was dropped: the label values of anubis_mirror_dropped_total.
DROP_REASONS: Final = (
    "no_server",  # the mirror pool had no server up, its address failed < MIRROR_RETRY ago, or no address
    "connect_failed",  # the mirror refused, timed out (the pool's connect_timeout) or was unreachable
    "lagging",  # the mirror fell MIRROR_BUFFER behind the client
    "broken",  # the mirror reset or failed before it had every byte
    "cut",  # the primary ended before the mirror had taken every byte
    "internal_error",  # a bug (logged with its traceback)
)
# Unread data at close makes the kernel send a reset instead of FIN: at most this much is drained first.
_DRAIN_AT_CLOSE: Final = 1 << 20
# SO_LINGER on with a zero timeout: close() sends a reset.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# After the primary ended cleanly, its mirror gets this long to take the rest of the copy, the
# FIN, and to close its side: the mirror's own pace, never the primary's, and bounded.
MIRROR_LINGER: Final = 2.0
_TASK_NAME: Final = "trioanubis.mirror"
_WATCH_TASK_NAME: Final = "trioanubis.mirror.watch"
# What the mirrors' answers are read into, and thrown away (nobody reads it, so tasks, and balancers
# embedded in two threads, may write into it at once).
_DISCARD: Final = bytearray(CHUNK_SIZE)
# The draws need no cryptographic quality, only independence per connection: one generator per
# thread, as faults.py's, so balancers embedded in two threads share none; a test seeds its thread's.
_draws = threading.local()


def _rng() -> random.Random:
    rng: random.Random | None = getattr(_draws, "rng", None)
    if rng is None:
        rng = _draws.rng = random.Random()
    return rng


def sampled(percent: float, rng: random.Random | None = None) -> bool:
    """Whether this connection is one of the `percent` mirrored (drawn from this thread's generator)."""
    if percent >= 100:
        return True
    return percent > 0 and (rng or _rng()).random() * 100 < percent


@final
class AddressTarget:
    """A mirror given as "host:port": a server of no pool, resolved as its host needs."""

    __slots__ = ("address", "down_until", "resolved_at", "resolving", "server")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.down_until = 0.0  # a failed connect: not tried again before then
        self.server = self._server_at([])  # made afresh by each lookup that finds addresses
        self.resolved_at = -float("inf")
        self.resolving: trio.Event | None = None

    async def ready(self) -> Server | None:
        """The server with its addresses (looked up if stale); None when the name resolves to none."""
        if trio.current_time() - self.resolved_at >= RESOLVE_EVERY:
            if self.resolving is not None:  # someone looks it up: use what we have, or wait for theirs
                if not self.server.sockaddrs:
                    await self.resolving.wait()
            else:
                await self._resolve()
        return self.server if self.server.sockaddrs else None

    def _server_at(self, sockaddrs: list[tuple[int, tuple[object, ...]]]) -> Server:
        """A server of no pool, so no Pool method writes it: a new one per lookup (pool.py stays the
        one writer of servers' state; a copy connecting to the old one keeps it)."""
        return Server(ServerConfig(self.address, str(self.address)), sockaddrs=sockaddrs)

    async def _resolve(self) -> None:
        self.resolving = resolving = trio.Event()
        try:
            self.server = self._server_at(await resolve_address(self.address))
        except OSError as exc:
            log.warning("mirror %s: cannot resolve %s: %s", self.address, self.address.host, exc)
        finally:
            literal = self.server.sockaddrs and ip_address_or_none(self.address.host) is not None
            self.resolved_at = float("inf") if literal else trio.current_time()
            self.resolving = None
            resolving.set()


@final
class PoolMirror:
    """What one pool's mirroring did, and its address target."""

    __slots__ = ("bytes", "connections", "dropped", "target")

    def __init__(self) -> None:
        self.connections = 0  # connections sampled for a copy
        self.bytes = 0  # delivered to the mirror
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.target: AddressTarget | None = None

    def target_for(self, address: Address) -> AddressTarget:
        if self.target is None or self.target.address != address:
            self.target = AddressTarget(address)
        return self.target


state_of: Final = PerPool(PoolMirror)  # per pool, counts kept across reloads


def mirror_filters(conn: Connection) -> tuple[Filters, Filters] | None:
    """The maker (makers.py): a mirror for the client's bytes when the pool mirrors and the draw says so."""
    pool = conn.pool
    assert pool is not None
    config = pool.config
    if not config.mirror or not sampled(config.mirror_percent):
        return None
    state = state_of(pool)
    state.connections += 1
    if not _reachable(conn, config, state):  # no copy to make: the connection keeps the fast path
        state.dropped["no_server"] += 1
        return None
    return (MirrorFilter(conn, config, state),), ()


def _reachable(conn: Connection, config: PoolConfig, state: PoolMirror) -> bool:
    """Whether the mirror may take a copy: its pool has a server up, or its address did not just fail."""
    if config.mirror_address is None:
        pool = conn.origin.pools.get(config.mirror)
        return pool is not None and bool(pool.candidates())
    return trio.current_time() >= state.target_for(config.mirror_address).down_until


@final
class MirrorFilter(Filter):
    """One mirrored connection's copy: its FIFO, its mirror connection and its task."""

    __slots__ = ("config", "conn", "dropped", "eof", "eof_sent", "held", "lot", "pending", "queue",
                 "received", "reset", "scope", "sent", "slot", "sock", "state")  # fmt: skip

    def __init__(self, conn: Connection, config: PoolConfig, state: PoolMirror) -> None:
        self.conn = conn
        self.config = config  # the mirroring pool's, as the connection started
        self.state = state
        self.queue: deque[bytes] = deque()
        self.held = 0  # bytes queued or pending: at most MIRROR_BUFFER
        self.pending = memoryview(b"")  # the part of a chunk the mirror has not taken yet
        self.eof = False  # the client sent EOF
        self.eof_sent = False
        self.reset = False  # the primary was reset or stopped: so is the mirror
        self.dropped = ""  # why the copy was dropped ("": it was not)
        self.sent = self.received = 0
        self.sock: _socket.socket | None = None
        self.slot: tuple[Pool, Server] | None = None  # the mirror pool's server slot we hold
        self.lot = trio.lowlevel.ParkingLot()  # the writer, waiting for bytes
        self.scope = trio.CancelScope()  # the task's: a drop cancels it
        extras = conn.extras
        if extras is not None and extras.prefix:  # what the primary got while connecting
            self._keep(extras.prefix)

    # ------------------------------------------------------- the relay's hooks

    def on_read(self, data: bytes) -> bytes | None:
        self.tap(data)
        return data

    async def on_eof(self) -> bool:
        self.tap_eof()
        return True

    def start(self, conn: Connection, nursery: trio.Nursery) -> None:
        """The copy's task runs where connections run, so it may outlive the relay (for at most
        MIRROR_LINGER); a task in the relay's nursery tells it when the primary ended."""
        self.begin(conn.origin.connections or nursery)
        nursery.start_soon(self._watch, name=_WATCH_TASK_NAME)

    def as_tap(self) -> MirrorFilter:
        return self

    async def _watch(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._primary_ended()

    # ------------------------------------------------------- the socket relay's hooks (relay.py's Tap)

    def begin(self, nursery: trio.Nursery) -> None:
        """Start the copy's task in `nursery` (the connections nursery: it may outlive the relay)."""
        nursery.start_soon(self.run, name=_TASK_NAME)

    def tap(self, data: bytes | memoryview) -> bool:
        if self.dropped:
            return False
        self._keep(data)
        return not self.dropped

    def tap_eof(self) -> None:
        if not self.dropped:
            self.eof = True
            if self.lot:
                self.lot.unpark_all()

    def relay_ended(self) -> None:
        self._primary_ended()

    def _primary_ended(self) -> None:
        """A clean end leaves the mirror MIRROR_LINGER to finish; a reset or a stop resets it now."""
        if self.conn.end in CLOSED_CLEANLY:
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + MIRROR_LINGER)
        else:
            self.reset = True
            self.scope.cancel()

    def _keep(self, data: bytes | memoryview) -> None:
        """Send `data` now if the writer is idle, else queue a copy of it (a drop if it overflows)."""
        if self.lot and self.sock is not None:  # the writer waits for bytes: send them now
            self._send_at_once(self.sock, data)
            return
        if self.held + len(data) > MIRROR_BUFFER:
            self.drop("lagging")
            return
        self.queue.append(bytes(data))  # a bytes object is kept as it is; the relay's buffer is copied
        self.held += len(data)

    def _send_at_once(self, sock: _socket.socket, data: bytes | memoryview) -> None:
        """What the socket takes now is sent from the relay's step (nothing queued or pending: the
        writer is idle); only the rest is copied, and the writer woken for it (a full socket) or a
        broken mirror: a task switch and a copy saved per chunk, as Trio's own sends try before
        they wait."""
        sent = self._send_some(sock, data)
        if sent < 0:
            self.drop("broken")
            return
        if sent < len(data):
            self.pending = memoryview(bytes(data[sent:]))  # the writer parks only with nothing pending
            self.held += len(self.pending)
            self.lot.unpark_all()

    def drop(self, reason: str) -> None:
        """Give up the copy: count why, forget what is queued, end the task (the primary goes on)."""
        if self.dropped:
            return
        self.dropped = reason
        self.state.dropped[reason] += 1
        self.queue.clear()
        self.pending = memoryview(b"")
        self.held = 0
        self.scope.cancel()

    # ------------------------------------------------------- the task

    async def run(self) -> None:
        """Connect, copy, discard the answers; give everything back however it ends (see the docstring)."""
        try:
            with self.scope:
                await self._mirror()
        except Exception:
            self._bug()
        finally:
            try:
                self._finish()
            except Exception:  # this task runs in the connections nursery: a bug here ends nothing else
                self._bug()

    def _bug(self) -> None:
        log.exception("pool %s: mirroring the connection from %s failed", self.config.name, self.conn.client)
        self.drop("internal_error")

    async def _mirror(self) -> None:
        server = await self._pick()
        if server is None:
            self.drop("no_server")
            return
        if not await self._connect(server):
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._discard)
            await self._write()

    async def _pick(self) -> Server | None:
        """The mirror server: picked from the mirror pool (a slot of it taken), or the address's."""
        config = self.config
        if config.mirror_address is not None:
            return await self.state.target_for(config.mirror_address).ready()
        pool = self.conn.origin.pools.get(config.mirror)
        if pool is None:  # a reload is adding it, or removed it
            return None
        server = pool.pick(client_key(self.conn.peer))
        if server is not None:
            pool.reserve(server)
            self.slot = (pool, server)
            self._greet(pool, server)
        return server

    def _greet(self, pool: Pool, server: Server) -> None:
        """Put the mirror pool's PROXY header first, if its servers get one."""
        version = server.send_proxy or pool.config.send_proxy
        if version == "none":
            return
        header = build_header(version, _host_port(self.conn.peer), _local(self.conn))
        self.queue.appendleft(header)
        self.held += len(header)

    async def _connect(self, server: Server) -> bool:
        """Connect within the mirror pool's connect_timeout; False (and the copy dropped) if it fails."""
        slot = self.slot
        timeout = (slot[0].config if slot is not None else self.config).connect_timeout
        started = trio.current_time()
        reason = "timeout"
        with trio.move_on_after(timeout):
            try:
                self.sock = await connect_any(server)
            except ConnectFailed as exc:
                reason = "" if isinstance(exc, OutOfResources) else exc.reason  # ours, not the server's
        if self.sock is not None:
            if slot is not None:
                slot[0].acquire(server)
                slot[0].record_connect_success(server, started, trio.current_time)
            return True
        if slot is not None and reason:
            slot[0].record_connect_failure(server, reason)
        elif slot is None and reason and self.state.target is not None:
            self.state.target.down_until = trio.current_time() + MIRROR_RETRY
        self.drop("connect_failed")
        return False

    async def _write(self) -> None:
        """Send the FIFO as it fills, then the client's EOF as a half-close."""
        sock = self.sock
        assert sock is not None
        while True:
            if self.pending:
                if not await self._send_pending(sock):
                    return
            elif self.queue:
                self.pending = memoryview(self.queue.popleft())
            elif self.eof:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.drop("broken")
                    return
                self.eof_sent = True
                return
            else:
                await self.lot.park()

    async def _send_pending(self, sock: _socket.socket) -> bool:
        while self.pending:
            sent = self._send_now(sock)
            if sent < 0:
                self.drop("broken")
                return False
            if not sent:
                await trio.lowlevel.wait_writable(sock)
        return True

    def _send_now(self, sock: _socket.socket) -> int:
        """Send what the socket takes of `pending` without waiting: the count, 0 when full, -1 when broken."""
        sent = self._send_some(sock, self.pending)
        if sent > 0:
            self.pending = self.pending[sent:]
            self.held -= sent
        return sent

    def _send_some(self, sock: _socket.socket, data: bytes | memoryview) -> int:
        """Send what the socket takes of `data` without waiting, counted: 0 when full, -1 when broken."""
        try:
            sent = sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            return -1
        self.sent += sent
        self.state.bytes += sent
        return sent

    async def _discard(self) -> None:
        """Read the mirror's answers and throw them away, until it closes its side."""
        sock = self.sock
        assert sock is not None
        while True:
            try:
                received = sock.recv_into(_DISCARD)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                if not self.eof_sent:
                    self.drop("broken")
                return
            if not received:
                return  # the mirror half-closed: the copy goes on (a closed mirror fails the next send)
            self.received += received

    # ------------------------------------------------------- the end

    def _finish(self) -> None:
        """However the task ended: flush what the socket takes at once, close as the primary ended,
        give the mirror pool's slot back (the last two whatever happens before them)."""
        sock, self.sock = self.sock, None
        slot, self.slot = self.slot, None
        try:
            if not self.dropped:
                if sock is not None:
                    self._flush(sock)
                if self.held:  # the primary ended first: the mirror will not get every byte
                    self.dropped = "cut"
                    self.state.dropped["cut"] += 1
            if sock is not None:
                self._say_goodbye(sock, clean=not self.dropped and not self.reset)
        finally:
            if sock is not None:
                trio.lowlevel.notify_closing(sock)
                sock.close()
            if slot is not None:
                slot[0].release(slot[1], self.sent, self.received)

    def _flush(self, sock: _socket.socket) -> None:
        """Send what is still queued, as far as the socket takes it without waiting."""
        while self.pending or self.queue:
            if not self.pending:
                self.pending = memoryview(self.queue.popleft())
            if self._send_now(sock) <= 0:
                return

    def _say_goodbye(self, sock: _socket.socket, clean: bool) -> None:
        """Before the close: FIN after the last byte (answers drained, or they would turn it into a
        reset), or a reset."""
        with contextlib.suppress(OSError):
            if not clean:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                return
            if self.eof and not self.eof_sent:
                sock.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < _DRAIN_AT_CLOSE:
                received = sock.recv_into(_DISCARD)
                if not received:
                    break
                drained += received



def _host_port(addr: tuple[object, ...]) -> tuple[str, int]:
    return str(addr[0]), int(addr[1])  # type: ignore[call-overload]


def _local(conn: Connection) -> tuple[str, int] | None:
    """Where the client connected to, for the mirror's PROXY header (as failover.py writes ours)."""
    extras = conn.extras
    if extras is not None and extras.local is not None:
        return extras.local
    try:
        return _host_port(normalise_peer(conn.client_sock.getsockname()))
    except OSError:
        return None


# ------------------------------------------------------------ what the operator sees


def shown(pool: Pool) -> PoolMirror | None:
    """What /stats and /metrics show of a pool's mirroring (made for them, never kept), or None."""
    state = state_of.get(pool)
    return PoolMirror() if state is None and pool.config.mirror else state


def stats(pool: Pool) -> dict[str, Any]:
    """A pool's mirroring for /stats; nothing when it has no mirror and never had one."""
    state = shown(pool)
    if state is None:
        return {}
    config = pool.config
    return {"mirror": {
        "to": config.mirror or None,
        "percent": config.mirror_percent if config.mirror else 0,
        "connections": state.connections,
        "bytes": state.bytes,
        "dropped": {reason: n for reason, n in state.dropped.items() if n},
    }}  # fmt: skip
