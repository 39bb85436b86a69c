"""One worker slot: a worker process, restarted when it dies, and the conversation with it.

Theory of operation: `WorkerSlot.run` keeps one worker process alive until
the supervisor stops. Each process gets a fresh socketpair as its control
channel and inherits its listening sockets (sockets.py; `passed` remembers
which, since a socket opened later cannot reach a running process); the
slot sends it the config with the operator's commands in effect (taking the
supervisor's `changes` lock, so no command overtakes the config and none is
missed), then the current state, then reads what it says (ready, applied,
done, answers, ejections) until it exits. A command it cannot take within
`ASK_TIMEOUT` gets it killed, so that its restart starts from the current
state rather than going on without the command. An exit while
the supervisor is not stopping is logged with its status and followed by a
restart after a backoff (`RESTART_MIN` doubling to `RESTART_MAX`, back to
`RESTART_MIN` after a worker ran `RESTART_STABLE` seconds). Questions to the
worker (`request`) carry an id and wait at most `ASK_TIMEOUT`; a worker that
exits answers every pending question with None.

The process is started from the main thread with `subprocess.Popen`, not
from a helper thread: PR_SET_PDEATHSIG fires when the *thread* that forked
the child ends, and Trio's worker threads end when idle. Its exit is awaited
through a pidfd where the platform has one, else in a Trio worker thread.
It runs the package the supervisor runs, from where the supervisor imported
it (`worker_command`), never a `trioanubis` in the working directory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Final, Protocol, final

import trio

from trioanubis.children import wait_exit
from trioanubis.config import Config
from trioanubis.errors import AnubisError, ChannelError
from trioanubis.workers.channel import Channel, Message, integer
from trioanubis.workers.sockets import Holds

log = logging.getLogger("trioanubis.supervisor")

# How long an admin request waits for every worker's answer or acknowledgement.
ASK_TIMEOUT: Final = 5.0
# After shutdown_delay + drain_timeout, how long a stopping worker gets before it is killed.
STOP_GRACE: Final = 5.0
# Restart backoff of a worker that exited on its own: from MIN doubling to MAX;
# a worker that ran STABLE seconds starts again from MIN.
RESTART_MIN: Final = 0.5
RESTART_MAX: Final = 30.0
RESTART_STABLE: Final = 60.0


class Owner(Protocol):
    """What a slot needs from its supervisor."""

    config: Config
    holds: Holds
    stopping: bool
    stop_requested: trio.Event
    changes: trio.Lock  # held while commands and reloads are sent, so a start sees them in order

    def config_message(self) -> Message: ...

    def runtime_message(self) -> Message: ...

    def state_message(self) -> Message: ...

    def ejected(self, worker_id: int, message: Message) -> None: ...


# Where this process imported the package from: the directory that holds `trioanubis/`.
PACKAGE_ROOT: Final = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A worker's start: the package the supervisor runs, from where the supervisor imported it. With
# `python -m` the working directory would come first on the worker's path, and a checkout there
# would shadow the installed build (a compiled one, or another version); a tree the supervisor
# had put on its path at run time would not be found at all. So the worker runs with the
# supervisor's interpreter flags (`-I` or `-E` ignore PYTHONPATH in both, or in neither), drops the
# working directory from its path (as `python -P` does), and puts the supervisor's root first when
# its path would find the package anywhere else.
_WORKER_START: Final = (
    "import importlib.util, os, runpy, sys; root = sys.argv.pop(1); "
    "sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
    "spec = importlib.util.find_spec('trioanubis'); "
    "found = os.path.abspath(spec.origin) if spec is not None and spec.origin else ''; "
    "real = os.path.realpath; "
    "sys.path[:0] = [] if real(os.path.dirname(os.path.dirname(found))) == real(root) else [root]; "
    "runpy.run_module('trioanubis.workers.worker', run_name='__main__', alter_sys=True)"
)


def worker_command() -> list[str]:
    """The command line that starts a worker (its options follow): this interpreter, with its flags."""
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-c", _WORKER_START, PACKAGE_ROOT]


@final
class WorkerSlot:
    """Worker number `id`: the process currently in it, its channel and its answers."""

    def __init__(self, supervisor: Owner, worker_id: int) -> None:
        self.supervisor = supervisor
        self.id = worker_id
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.serving = False  # the current process said "ready"
        self.ready = trio.Event()  # set once, at the first "ready"
        self.restarts = 0
        self.passed: dict[str, int] = {}  # concrete address → descriptor the current process inherited
        self.applied = 0  # highest state seq it acknowledged
        self.configured = False  # the current process has its config and the commands in effect
        self.done = 0  # highest command seq it carried out (or refused)
        self.refusals: dict[int, str] = {}  # command seq → why it refused it
        self._next_id = 0
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._acks = trio.lowlevel.ParkingLot()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def run(self) -> None:
        """Keep a worker process in this slot until the supervisor stops."""
        backoff = RESTART_MIN
        try:
            await self._keep_running(backoff)
        finally:
            if self.supervisor.stopping:
                self.ready.set()  # never leave the supervisor waiting for a slot that stopped

    async def _keep_running(self, backoff: float) -> None:
        while not self.supervisor.stopping:
            started = trio.current_time()
            status = await self._run_once()
            if self.supervisor.stopping:
                log.info("worker %d exited (%s)", self.id, describe_status(status))
                return
            if not self.ready.is_set():  # it never served: starting again would fail the same way
                raise AnubisError(f"worker {self.id} exited ({describe_status(status)}) before it "
                                  "served; its log lines above say why")  # fmt: skip
            if trio.current_time() - started >= RESTART_STABLE:
                backoff = RESTART_MIN
            log.error(
                "worker %d exited (%s); starting it again in %gs", self.id, describe_status(status), backoff
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX)
            self.restarts += 1

    def inherited(self) -> dict[str, int]:
        """The sockets to name in a config message: held now, and inherited by the running process."""
        now = self.supervisor.holds.inherited(self.id)
        return {address: fd for address, fd in now.items() if self.passed.get(address) == fd}

    async def _run_once(self) -> int:
        await self.supervisor.holds.renew(self.id)  # after an exit of its own: a fresh socket
        mine, theirs = socket.socketpair()
        try:
            process = self._spawn(theirs.fileno())
        finally:
            theirs.close()
        self.process = process
        self.channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(mine)))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                async with self.supervisor.changes:  # no command overtakes the config, none is missed
                    await self._send({**self.supervisor.config_message(), "inherited": self.inherited(),
                                      **self.supervisor.runtime_message()})  # fmt: skip
                    self.configured = True
                await self._send(self.supervisor.state_message())
                nursery.start_soon(self._stop_on_time)
                status = await wait_exit(process)
                nursery.cancel_scope.cancel()
                return status
        finally:
            self.serving = self.configured = False
            with trio.CancelScope(shield=True):
                await self.channel.aclose()
            if process.poll() is None:  # cancelled: take the worker down with us
                process.kill()
                process.wait()
            if not self.supervisor.stopping:
                self.supervisor.holds.release(self.id)
            self._fail_waiting()

    def _spawn(self, control_fd: int) -> subprocess.Popen[bytes]:
        """Start the worker from this (the main) thread: PR_SET_PDEATHSIG follows the thread that forked."""
        command = [*worker_command(), "--control-fd", str(control_fd),
                   "--worker-id", str(self.id), "--parent-pid", str(os.getpid())]  # fmt: skip
        self.passed = self.supervisor.holds.inherited(self.id)
        fds = (control_fd, *self.passed.values())
        process = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL)
        log.info("worker %d started (pid %d)", self.id, process.pid)
        return process

    async def _stop_on_time(self) -> None:
        """Once stopping, kill the worker if it outlives shutdown_delay + drain_timeout + STOP_GRACE."""
        await self.supervisor.stop_requested.wait()
        settings = self.supervisor.config.settings
        await trio.sleep(settings.shutdown_delay + settings.drain_timeout + STOP_GRACE)
        if self.process is not None and self.process.poll() is None:
            log.error("worker %d did not stop in time: killing it", self.id)
            self.process.kill()

    async def _send(self, message: Message) -> bool:
        channel = self.channel
        if channel is None:
            return False
        try:
            await channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _read(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = await self.channel.receive()
            except ChannelError as exc:
                log.error("worker %d: control channel: %s; ignored", self.id, exc)
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if message is None:
                return
            try:
                self._dispatch(message)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("worker %d: malformed %r message (%s); ignored", self.id, message.get("t"), exc)

    def _dispatch(self, message: Message) -> None:
        kind = message["t"]
        if kind == "ready":
            self.serving = True
            self.ready.set()
        elif kind == "applied":
            self.applied = max(self.applied, integer(message, "seq"))
        elif kind == "done":
            seq = integer(message, "seq")
            if "error" in message:
                self.refusals[seq] = str(message["error"])[:300]
            self.done = max(self.done, seq)
            self._acks.unpark_all()
        elif kind in ("answer", "reloaded"):
            waiting = self._waiting.pop(integer(message, "id"), None)
            if waiting is not None:
                waiting[1].append(message.get("value", message))
                waiting[0].set()
        elif kind == "eject":
            self.supervisor.ejected(self.id, message)
        else:
            raise ValueError(f"unknown message type {kind!r}")

    def _fail_waiting(self) -> None:
        for event, _ in self._waiting.values():
            event.set()
        self._waiting.clear()
        self._acks.unpark_all()

    async def request(self, message: Message, timeout: float = ASK_TIMEOUT) -> Any:
        """Send `message` with a fresh id; its answer, or None (no answer in time, worker gone)."""
        self._next_id += 1
        event, box = trio.Event(), list[Any]()
        self._waiting[self._next_id] = (event, box)
        if not await self._send({**message, "id": self._next_id}):
            self._waiting.pop(self._next_id, None)
            return None
        with trio.move_on_after(timeout):
            await event.wait()
        self._waiting.pop(self._next_id, None)
        return box[0] if box else None

    async def deliver(self, message: Message) -> None:
        """Send a command; a worker that cannot take it within ASK_TIMEOUT is killed, so that its
        restart starts from the current state instead of going on without the command."""
        with trio.move_on_after(ASK_TIMEOUT):
            await self._send(message)
            return
        log.error("worker %d took no command for %gs: killing it (it starts again with the current "
                  "state)", self.id, ASK_TIMEOUT)  # fmt: skip
        self.kill()

    async def wait_done(self, seq: int) -> str | None:
        """None once this worker carried out command `seq` (or its process is gone: the next one
        starts with it); otherwise why not, for the operator."""
        with trio.move_on_after(ASK_TIMEOUT):
            while self.configured and self.done < seq:
                await self._acks.park()
            refusal = self.refusals.pop(seq, None)
            return None if refusal is None else f"refused it: {refusal}"
        return f"did not confirm it in {ASK_TIMEOUT:g}s"

    async def send(self, message: Message) -> None:
        with trio.move_on_after(ASK_TIMEOUT):
            await self._send(message)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
