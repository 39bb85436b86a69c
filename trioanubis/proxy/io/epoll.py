"""Readiness for relay sockets: one edge-triggered epoll of our own, one dispatcher task.

Theory of operation: Trio's `wait_readable` arms a one-shot epoll
registration for every wait (EPOLL_CTL_MOD) and disarms it after the wake-up:
two `epoll_ctl` calls and a task switch per wait. Measured on the 2-core
development machine from Python: 0.4-1.1 µs per `epoll_ctl`, against 18-23 µs
for a 100-byte `send` plus `recv_into` over loopback TCP, so the calls
themselves are a few per cent of a message's cost; the task switches (and
Trio's bookkeeping around each wait) are the larger part, and the dispatcher's
steps for driven relays below remove them. The relay's sockets join this poller's epoll once,
edge-triggered, for both directions. A relay task that must wait parks
itself here (`wait_task_rescheduled`); the dispatcher task sleeps on the
epoll's own descriptor in Trio's epoll (`readable.ReadableWait`: Trio's wait
without its Python frames, in the compiled build), and when it becomes readable it drains
the ready list, advances the relays that own the ready sockets and
reschedules the tasks parked in plain waits (connects, a PROXY header sent).

Why edge-triggered without EPOLLONESHOT is safe. ONESHOT exists so that a
registration cannot fire twice before its waiter re-arms it, and so that
several threads never wake for one event; it costs an `epoll_ctl` per wait,
which is what this poller is for avoiding. Here:
- An edge is only waited for after a system call showed the socket drained
  (EAGAIN, or a read shorter than the buffer) or full (EAGAIN or a partial
  send); the kernel then signals the next arrival or the next free space as
  a new edge. The task parks right after the failed call, with no
  checkpoint in between; Trio runs one task at a time, so the dispatcher
  cannot take that edge off the ready list before the task is parked. An
  event that finds no task parked is dropped: whoever comes next calls first.
  A read event nobody took is remembered (`_unclaimed`) until the socket is
  driven, so that a relay starting on it reads before it waits (`_start`);
  a client's socket is read first on the event its registration reports.
- A FIN or reset queued behind data arrives in the same edge as the data,
  and a short read returns only the data. The dispatcher therefore remembers
  every socket whose peer closed or failed (`hung_up`; a driven relay's
  direction too, `Relay.hang_up`), and the relay reads again instead of
  waiting after a short read on those.
- One thread and one dispatcher: an event can wake at most the one reader
  and the one writer a descriptor may have (a second is BusyResourceError).
- Sockets are never duplicated, so closing one removes it from the epoll;
  `forget` wakes its waiters and `register` clears a stale `hung_up` entry,
  so a reused descriptor number starts clean.
A socket joins for reading (`register`); its writability is reported from
the first wait to write to it on (`want_writable`, one `epoll_ctl` then),
so a new socket's "writable" is no event. A connecting socket joins
writable right after connect() returned EINPROGRESS and waits at once:
registering reports the state at that moment, so a handshake that
completed in between is not missed.

A relay is driven here (`drive`): its two sockets belong to it in this
poller for as long as it runs, and the dispatcher calls `relay.ready` for
their events in place of waking anyone, whether the relay's task is parked
or not, so no event is dropped. The relay advances the direction that
waited for that socket (one read and one complete send, usually) and asks
for its task only for what a step cannot finish: the end, a direction that
stopped for fairness, or an exception, which the task raises (a bug ends
that connection only). The task parks once for both sockets; `wake` checks
that it is still parked for that relay (Trio clears `custom_sleep_data` when
it reschedules a task, cancelled or not), so a cancelled task is never
rescheduled twice and its abort needs no state of its own.

Cancellation works as anywhere in Trio: a parked task's abort callback
removes it. `forget` wakes anything still parked on a descriptor with
`ClosedResourceError` before the socket is closed (Trio's notify_closing
rule, which `close` follows for sockets Trio's epoll never saw); closing a
socket removes it from the epoll by itself. `interrupt` wakes a waiter with
another error (the Timer cancels a connect attempt this way).

While events keep coming the dispatcher does not sleep: it polls its epoll
again after each batch, and lets Trio's loop run (a checkpoint) only when it
woke a task or after `EVENTS_PER_CHECKPOINT` events. At a low rate (a batch
of at most `FEW_EVENTS` right after a sleep) it looks again without the
checkpoint: that look finds nothing, and it sleeps in Trio's epoll with the
woken tasks still to run, one dispatcher step fewer per wake-up.
"""

from __future__ import annotations

import _socket
import os
import select
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast, final

import outcome
import trio

from trioanubis.proxy.io.base import (
    AGAIN,
    READ,
    WRITE,
    Capabilities,
    Driven,
    Readiness,
    new_scratch,
)
from trioanubis.proxy.io.readable import ReadableWait
from trioanubis.proxy.io.sockcalls import (
    READY_HUNG_UP,
    READY_READ,
    READY_SHIFT,
    READY_WRITE,
    epoll_ctl,
    epoll_ready,
)
from trioanubis.proxy.io.woken import WOKEN, parking

if TYPE_CHECKING:
    # The one relay this backend drives. The interface takes any `Driven` (base.py); inside, the relay
    # is typed as itself (`cast`, a type check), so that the compiled build reads its fields and calls
    # its methods natively instead of by name: about 20 lookups a connection.
    from trioanubis.proxy.relay import Direction, Relay

# Ready descriptors taken from the kernel per dispatcher wake-up.
MAX_EVENTS: Final = 1024
# Events the dispatcher may handle by steps alone (waking no task) before it
# lets Trio's loop run. A Trio loop turn per batch of events was a third of the
# dispatcher's cost; 256 events (about a millisecond of steps) bound how long
# Trio's own I/O (accepts, health checks) waits. Measured at wrk -c10 through
# two nginx backends: added p99 1.1-1.3 ms with 8 batches (~40 events), 0.8 ms here.
EVENTS_PER_CHECKPOINT: Final = 256
# A batch this small, right after a sleep, that woke a task is a low rate: the dispatcher looks
# again at once (to find nothing, and sleep) instead of a checkpoint first, a step more.
FEW_EVENTS: Final = 4
# Linux's values, read with a default so that importing this module works
# where epoll does not exist (only `Poller()` needs it).
_EPOLLIN: Final[int] = getattr(select, "EPOLLIN", 0x001)
_EPOLLOUT: Final[int] = getattr(select, "EPOLLOUT", 0x004)
_EPOLLERR: Final[int] = getattr(select, "EPOLLERR", 0x008)
_EPOLLHUP: Final[int] = getattr(select, "EPOLLHUP", 0x010)
_EPOLLRDHUP: Final[int] = getattr(select, "EPOLLRDHUP", 0x2000)
_EPOLLET: Final[int] = getattr(select, "EPOLLET", 1 << 31)
# What makes a descriptor readable, writable or hung up in the ready list (sockcalls.py's READY_*).
_HANG_UP_EVENTS: Final = _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
_READ_EVENTS: Final = _EPOLLIN | _HANG_UP_EVENTS
_WRITE_EVENTS: Final = _EPOLLOUT | _EPOLLHUP | _EPOLLERR
# A socket joins for reading only; EPOLLOUT is added once something waits to write to it
# (a connect, a peer that stopped taking bytes): registering with it would report every
# new socket writable at once, an event that wakes the dispatcher for nothing.
_REGISTER: Final = _EPOLLIN | _EPOLLRDHUP | _EPOLLET
_REGISTER_WRITABLE: Final = _REGISTER | _EPOLLOUT

# Trio's calls and the shared wake-up, read once: in the compiled build a module-level Final is a
# static, a module global a lookup by name at every use.
_reschedule: Final = trio.lowlevel.reschedule
_current_task: Final = trio.lowlevel.current_task
_wait_task_rescheduled: Final = trio.lowlevel.wait_task_rescheduled
_WOKEN: Final = WOKEN
# The C helper's epoll_ctl (proxy/io/sockcalls.py; the compiled build on Linux), else None and the
# epoll object's methods: registering is two system calls a connection.
_EPOLL_CTL: Final = epoll_ctl
# Its epoll_ready, else None and `ready_from(epoll.poll(...))`: the ready list, an int per descriptor.
_EPOLL_READY: Final = epoll_ready
_CTL_ADD: Final = 1  # Linux's EPOLL_CTL_ADD (the select module does not name it)
_CTL_MOD: Final = 3  # EPOLL_CTL_MOD
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED


# The socket's own close, without the stdlib wrapper's two Python calls (`close`, `_real_close`);
# the relay's sockets never had a `makefile` whose references the wrapper would count.
_close: Final[Callable[[_socket.socket], None]] = _socket.socket.close


def ready_from(events: list[tuple[int, int]]) -> list[int]:
    """`select.epoll.poll`'s (fd, events) pairs packed as the C helper's `epoll_ready` packs them."""
    return [fd << READY_SHIFT
            | (READY_READ if got & _READ_EVENTS else 0)
            | (READY_WRITE if got & _WRITE_EVENTS else 0)
            | (READY_HUNG_UP if got & _HANG_UP_EVENTS else 0)
            for fd, got in events]  # fmt: skip


def _socket_closed() -> trio.ClosedResourceError:
    return trio.ClosedResourceError("socket closed")


def _abort(waiters: dict[int, trio.lowlevel.Task], fd: int, _: object) -> trio.lowlevel.Abort:
    del waiters[fd]
    return _SUCCEEDED


def _abort_driven(_: object) -> trio.lowlevel.Abort:
    """A driven relay's task, cancelled: Trio clears its `custom_sleep_data`, so nothing wakes it twice."""
    return _SUCCEEDED


# A driven relay's task parks with this, one await for all of them (woken.py's `parking`).
_DRIVEN: Final = parking(_abort_driven)


@final
class Poller(Readiness):
    """The `epoll` readiness backend (see trioanubis.proxy.io)."""

    def __init__(self) -> None:
        # Every event's EPOLLERR / EPOLLHUP lands in hung_up before a wake-up: reports_errors.
        self.caps = Capabilities("epoll", splice=hasattr(os, "splice"), reports_errors=True,
                                 edge_triggered=True)  # fmt: skip
        self.scratch = new_scratch()
        self.looks = 0  # ready lists taken, empty or not
        self._epoll = select.epoll()
        self._epfd = self._epoll.fileno()
        self._readers: dict[int, trio.lowlevel.Task] = {}
        self._writers: dict[int, trio.lowlevel.Task] = {}
        # Both sockets of every relay being driven, by descriptor (None: no relay's): a list, as
        # HAProxy's fdtab is an array, because a lookup by hash was a tenth of a request's cost.
        self._owners: list[Relay | None] = []
        self._errors: dict[Relay, Exception] = {}  # what a step raised, until its relay's task raises it
        self._woke = False  # a relay's task was woken during this batch of events
        self._eofs: list[tuple[Relay, Direction]] = []  # first EOFs to pass on after the next batch
        self._sleeping = False  # the dispatcher waits in Trio's epoll: an EOF is passed on at once
        self._held: list[Relay] = []  # relays whose client's early bytes go before the next poll
        self.hung_up: set[int] = set()  # sockets whose peer sent FIN or failed
        self._unclaimed: set[int] = set()  # registered sockets whose read event found no one waiting
        self._writable: set[int] = set()  # registered sockets whose writability is reported too
        self.clock: Callable[[], float] | None = trio.current_time  # until `run` takes the run's clock
        self.clock_offset = 0.0

    def register(self, fd: int, *, writable: bool = False) -> None:
        """Let `fd` join the epoll, starting clean: what the sets knew of an earlier socket with its
        number goes here (and only here: closing one leaves its entries, and a test here is no call)."""
        if fd in self.hung_up:
            self.hung_up.remove(fd)
        if fd in self._unclaimed:
            self._unclaimed.remove(fd)
        if writable:
            self._writable.add(fd)
        elif fd in self._writable:
            self._writable.remove(fd)
        events = _REGISTER_WRITABLE if writable else _REGISTER
        if _EPOLL_CTL is not None:
            _EPOLL_CTL(self._epfd, _CTL_ADD, fd, events)
        else:
            self._epoll.register(fd, events)

    def want_writable(self, fd: int) -> None:
        """Something waits to write to `fd`: report its writability from now on (one `epoll_ctl`, once).

        The modification reports the state at that moment, as registering does,
        so space freed since the send that found none is not missed.
        """
        if fd not in self._writable:
            self._writable.add(fd)
            if _EPOLL_CTL is not None:
                _EPOLL_CTL(self._epfd, _CTL_MOD, fd, _REGISTER_WRITABLE)
            else:
                self._epoll.modify(fd, _REGISTER_WRITABLE)

    def unregister(self, fd: int) -> None:
        """Leave this poller: the socket is handed to Trio's own waits (the stream relay, streams.py)."""
        self.forget(fd)
        self._epoll.unregister(fd)

    # The two waits are plain functions that register the calling task and return
    # Trio's wait itself, so `await poller.wait_readable(fd)` parks the task with
    # no frame of ours in between (an idle connection's two parked pumps are most
    # of its memory). Call them only as `await poller.wait_...(fd)`.

    def wait_readable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` (registered) may have bytes, EOF or an error to read."""
        readers = self._readers
        if fd in readers:
            raise trio.BusyResourceError("another task is already reading this socket")
        readers[fd] = _current_task()
        return _wait_task_rescheduled(partial(_abort, readers, fd))

    def wait_writable(self, fd: int) -> Awaitable[object]:
        """Park until `fd` (registered) may take more bytes."""
        writers = self._writers
        if fd in writers:
            raise trio.BusyResourceError("another task is already writing this socket")
        self.want_writable(fd)
        writers[fd] = _current_task()
        return _wait_task_rescheduled(partial(_abort, writers, fd))

    def drive(self, driven: Driven) -> Coroutine[Any, Any, None]:
        """Run `relay` in the calling task: the dispatcher advances it, the task waits for its end.

        Both sockets are the relay's in this poller while it runs: the
        dispatcher calls `relay.ready` for their events, whether the task is
        parked or not (no event is dropped). The task parks once for both, and
        wakes for a direction that stopped for fairness (`AGAIN`: after a
        checkpoint it advances it itself), for the relay's end, or to raise
        what a step raised.

        A plain function returning `_drive` itself, the relay typed as itself:
        the frame an idle connection keeps holds no local more for the cast.
        """
        return self._drive(cast("Relay", driven))

    async def _drive(self, relay: Relay) -> None:
        # Few locals: an idle connection keeps this frame, 8 bytes a slot.
        self._own(relay.client_fd, relay)
        self._own(relay.server_fd, relay)
        errors = self._errors
        try:
            self._start(relay)
            while True:
                if relay.resume() and not (errors and relay in errors):  # stopped for fairness: a turn
                    await trio.lowlevel.checkpoint()
                    continue
                if errors and relay in errors:
                    raise errors.pop(relay)
                if relay.over:
                    return
                relay.driver = _current_task()
                relay.driver.custom_sleep_data = relay  # what `wake` checks: still parked for this relay
                await _DRIVEN
        finally:
            relay.driver = None
            errors.pop(relay, None)
            self._owners[relay.client_fd] = self._owners[relay.server_fd] = None
            relay.stopped()

    def _own(self, fd: int, relay: Relay) -> None:
        """`relay` owns `fd` in this poller; the table grows (doubling) to the highest descriptor, and
        stays as large (8 bytes a descriptor: 8 MB at a million, as HAProxy's fdtab)."""
        if fd < 0:  # a closed socket's -1 would index the table from its end
            raise ValueError(f"a relay's socket is closed (descriptor {fd})")
        owners = self._owners
        if fd >= len(owners):
            owners.extend([None] * max(fd + 1 - len(owners), len(owners)))
        owners[fd] = relay

    def _start(self, relay: Relay) -> None:
        """The relay's first moves: the client's socket joins the epoll, and no socket is read here.

        Registering reports what the client's socket holds at that moment (an
        edge for bytes queued since `read_early`), so its next read is the
        dispatcher's, on that event. The client's bytes read before connecting
        (`read_early`) go in the dispatcher's next batch, before it polls
        (`_send_held`), with the other new connections': a server then finds
        several requests at once instead of waking for each (sent one by one
        from each task's step, the backends slept and woke 5 to 7 times as
        often, and the connection cost 15-18 % more). With the dispatcher asleep there
        is no batch to wait for, and they go now. The server socket joined to
        connect, and each of its events since either is still queued in the
        kernel (the dispatcher gives it to the relay, which owns the socket
        now) or was taken while nobody waited to read it (`_unclaimed`): only
        then is it read before the first wait (`resume`).
        """
        up, down = relay.up, relay.down
        assert up is not None and down is not None  # `Relay.run` made them before it asked to drive
        self.register(relay.client_fd)
        if not up.unsent:
            up.wants = READ
        elif self._sleeping:
            relay.send_held(up)  # may end the relay: `drive` then sees it over
        else:
            up.wants = WRITE  # what a writable server socket may send meanwhile, too
            self._held.append(relay)
        down.hung_up = relay.server_fd in self.hung_up  # its FIN came before the relay took the socket
        unclaimed = self._unclaimed
        if relay.server_fd in unclaimed:
            unclaimed.remove(relay.server_fd)
            down.wants = AGAIN
        else:
            down.wants = READ

    def _send_held(self, relays: list[Relay]) -> None:
        """Send the early bytes of the relays that started since the last batch (`_start`)."""
        for relay in relays:
            up = relay.up
            assert up is not None
            if up.wants != WRITE or not up.unsent:  # ended, or a writable event sent them already
                continue
            try:
                wake = relay.send_held(up)
            except Exception as exc:  # a bug: raised in the relay's task, ends its connection
                self._errors[relay] = exc
                wake = True
            if wake:
                self.wake(relay)

    def wake(self, driven: Driven) -> None:
        """Wake the task parked in `drive` for `relay`, if it is parked there."""
        relay = cast("Relay", driven)
        task = relay.driver
        if task is not None and task.custom_sleep_data is relay:
            relay.driver = None
            _reschedule(task, _WOKEN)
            self._woke = True

    def pass_eof(self, driven: Driven, direction: Any) -> None:
        """Pass a server's first EOF on after the dispatcher's next batch of events (at once while it
        sleeps).

        The client may close meanwhile: one that had its whole answer closes
        without waiting for our FIN (wrk, any `Connection: close` client). Its
        EOF is then the second, and the close that ends the connection sends
        both FINs: the shutdown is saved. A client that waits for the FIN gets
        it one batch later.
        """
        relay = cast("Relay", driven)
        if self._sleeping:
            relay.forward_eof(direction)
        else:
            self._eofs.append((relay, direction))

    def _pass_eofs(self, eofs: list[tuple[Relay, Direction]]) -> None:
        for relay, direction in eofs:
            try:
                relay.forward_eof(direction)
            except Exception as exc:  # a bug: raised in the relay's task, ends its connection
                self._errors[relay] = exc
                self.wake(relay)

    def close(self, sock: _socket.socket) -> None:
        """Close a socket that only this poller ever waited on, waking its waiters first.

        Trio's `notify_closing` is not needed (Trio's epoll never saw the
        socket), and closing removes it from this epoll by itself.
        """
        fd = sock.fileno()
        if fd in self._readers or fd in self._writers:  # a relay's sockets have none: they are driven
            self.interrupt(fd, _socket_closed)
        _close(sock)

    def forget(self, fd: int) -> None:
        """Wake whatever waits on `fd` with ClosedResourceError; call before closing it.

        What `hung_up`, `_unclaimed` and `_writable` hold for `fd` stays until a
        socket with its number registers (`register` clears it): one test there
        instead of three calls per closed socket here.
        """
        if fd in self._readers or fd in self._writers:  # a relay's sockets have none: they are driven
            self.interrupt(fd, _socket_closed)

    def interrupt(self, fd: int, error: Callable[[], BaseException]) -> bool:
        """Wake whatever waits on `fd`, raising `error()` in it; False when nothing waited."""
        woke = False
        for waiters in (self._readers, self._writers):
            task = waiters.pop(fd, None)
            if task is not None:
                _reschedule(task, outcome.Error(error()))
                woke = True
        return woke

    async def run(self) -> None:
        """The dispatcher: wake parked relay tasks as their sockets become ready."""
        readers, writers, owners, hung_up = self._readers, self._writers, self._owners, self.hung_up
        unclaimed = self._unclaimed
        poll = self._epoll.poll
        epfd = self._epfd
        idle = ReadableWait(epfd)
        self.take_clock(trio.lowlevel.current_clock())
        handled = 0  # events handled without waking a task, since the last checkpoint
        due: list[tuple[Relay, Direction]] = []  # first EOFs read before this batch: passed on after it
        slept = False  # this batch woke the dispatcher from a sleep in Trio's epoll
        while True:
            if self._held:
                held, self._held = self._held, []
                self._send_held(held)
            if _EPOLL_READY is not None:
                ready = _EPOLL_READY(epfd, MAX_EVENTS)
            else:
                ready = ready_from(poll(0, MAX_EVENTS))
            self.looks += 1
            if not ready:
                if due or self._eofs:  # no batch to wait for: pass them on before sleeping
                    eofs, due, self._eofs = due + self._eofs, [], []
                    self._pass_eofs(eofs)
                # Idle: sleep in Trio's epoll until ours has something (a task woken above runs first).
                self._sleeping = True
                try:
                    await idle.wait()
                finally:
                    self._sleeping = False
                slept = True
                continue
            rested, slept = slept, False
            woke = False
            for entry in ready:  # fd << READY_SHIFT | what its events say (sockcalls.py)
                fd = entry >> READY_SHIFT
                if entry & READY_HUNG_UP:
                    hung_up.add(fd)
                owner = owners[fd] if fd < len(owners) else None
                if owner is not None:  # a driven relay's socket: advance it in its task's place
                    try:
                        if entry & READY_HUNG_UP:
                            owner.hang_up(fd)
                        wake = owner.ready(fd, bool(entry & READY_READ), bool(entry & READY_WRITE))
                    except Exception as exc:  # a bug: raised in the relay's task, ends its connection
                        self._errors[owner] = exc
                        wake = True
                    if wake:
                        self.wake(owner)
                    continue
                if entry & READY_READ:
                    if fd in readers:
                        _reschedule(readers.pop(fd), _WOKEN)
                        woke = True
                    else:  # bytes or an EOF nobody waited for: a relay that takes this socket reads first
                        unclaimed.add(fd)
                if entry & READY_WRITE and fd in writers:
                    _reschedule(writers.pop(fd), _WOKEN)
                    woke = True
            if due:
                self._pass_eofs(due)
            due, self._eofs = self._eofs, []
            woke = woke or self._woke
            self._woke = False
            handled += len(ready)
            if woke or handled >= EVENTS_PER_CHECKPOINT:
                if woke and rested and len(ready) <= FEW_EVENTS:
                    # Woken from a sleep for a few events: a low rate, where a look after the woken
                    # tasks ran would find nothing, so the checkpoint would be a step more per
                    # wake-up. Look now instead (and sleep: the woken tasks run first, and an event
                    # that comes meanwhile wakes the dispatcher at the next turn).
                    continue
                # Let the woken tasks (and Trio's own I/O) run, then look again
                # without re-arming Trio's epoll.
                handled = 0
                await trio.lowlevel.checkpoint()

    def shut_down(self) -> None:
        """Close the epoll, once nothing uses this poller (the balancer's run has returned)."""
        if not self._epoll.closed:
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()
            self._epfd = -1  # a register after this raises ValueError, as the closed epoll does
