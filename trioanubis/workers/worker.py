"""One worker process: today's balancer, fed its config, health state and commands by the supervisor.

Theory of operation: the supervisor starts this module (slot.py's `worker_command`)
with one end of a socketpair as `--control-fd`. The first message is the
config (the TOML text the supervisor validated, with each listener's concrete
address); the worker builds a `Balancer` from it whose health "checks" follow
the supervisor (`Worker.follow`: started() once a snapshot covering the pool
has been applied, so no client is sent to a server nobody checked) and whose
listeners open the shared sockets (sockets.py). Then it serves.

The config message carries the operator's commands in effect (control.py),
applied before the balancer runs, so a worker that starts or restarts serves
what the others serve. The control task then dispatches what arrives:
`state` snapshots (applied and acknowledged with their `seq`; one built
before the last command received is stale and skipped), `command` messages
and `config` reloads (queued, and carried out one at a time in arrival order
by `apply_changes`, through the same `Balancer.command` and `apply_config` a
single process uses; a command is confirmed with `done` and its `seq`, or
with the error that refused it), `ask` questions (stats, metrics, ready), and
`stop` (drains; with `now`, cuts at once). A passive
ejection seen here is applied at once and sent up as `eject`; the server is
held down locally until the supervisor's view shows it down too or
`eject_for` passes, so a snapshot already on its way cannot undo it.

The worker never outlives its supervisor: on Linux the kernel sends it
SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), and everywhere the end
of its control channel stops it the same way (drain, then exit). SIGINT,
SIGHUP and SIGUSR2 are ignored: a terminal's Ctrl-C or hang-up, or a signal
sent to the whole group, reaches the supervisor, which tells each worker
what to do (SIGUSR2: the supervisor upgrades, workers included).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final, final

import trio

from trioanubis.app import Balancer, settle
from trioanubis.children import set_death_signal
from trioanubis.config import Config, parse_address, parse_config
from trioanubis.control import CommandError, decode_command
from trioanubis.errors import AnubisError, ChannelError
from trioanubis.ops.accesslog import configure_logging, log_fatal
from trioanubis.ops.metrics import prometheus, stats
from trioanubis.pool import Pool, Server
from trioanubis.workers.channel import Channel, Message, integer
from trioanubis.workers.merge import ServerKey, apply_snapshot, key_of
from trioanubis.workers.sockets import open_shared_socket

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger("trioanubis.worker")

# Messages waiting to go up (ejections, answers); more than this means the
# supervisor is not reading, and ejections are best effort anyway.
OUTBOX_SIZE: Final = 256


def worker_config(message: Mapping[str, Any]) -> Config:
    """The Config a `config` message describes: its text, minus [admin], on the concrete binds.

    Raises ConfigError (the text is bad) or ValueError/KeyError/TypeError (the message is).
    """
    data = tomllib.loads(str(message["text"]))
    data.pop("admin", None)  # the admin endpoint lives in the supervisor only
    config = parse_config(data, str(message["source"]))
    binds: Mapping[str, str] = message["binds"]
    listeners = {name: dataclasses.replace(lc, bind=parse_address(binds[name], allow_any_host=True))
                 for name, lc in config.listeners.items()}  # fmt: skip
    settings = dataclasses.replace(config.settings, pid_file="", workers=1, state_file="")  # the supervisor's
    return dataclasses.replace(config, listeners=listeners, settings=settings)


@final
class Worker:
    """The control side of one worker: applies what the supervisor sends, reports what it sees."""

    def __init__(self, channel: Channel, worker_id: int, inherited: Mapping[str, int]) -> None:
        self.channel = channel
        self.id = worker_id
        self.inherited = dict(inherited)
        self.balancer: Balancer | None = None
        self.state: Message | None = None  # the last snapshot
        self.state_arrived = trio.Event()  # replaced after each snapshot
        self.held: dict[tuple[str, ServerKey], float] = {}  # ejected here → until when
        self._outbox, self._outgoing = trio.open_memory_channel[Message](OUTBOX_SIZE)
        # Commands and reloads, applied one at a time in the order they came. Unbounded: the
        # supervisor sends them one change at a time, and dropping one would leave this worker behind.
        self._changes, self._changes_due = trio.open_memory_channel[Message](math.inf)
        self.commanded = 0  # the seq of the last command received: an older snapshot is stale

    def make_balancer(self, config: Config) -> Balancer:
        opener = partial(open_shared_socket, inherited=self.inherited)
        self.balancer = Balancer(config, open_socket=opener, health=self.follow, shared_state=False)
        self._watch_ejections()
        return self.balancer

    # ----------------------------------------------------------- health state

    async def follow(
        self, pool: Pool, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stands in for the pool's health checks: started() once the supervisor's state is applied."""
        while self.state is None or pool.name not in self.state["pools"]:
            await self.state_arrived.wait()
        self._apply({pool.name: pool}, self.state)
        task_status.started()
        await trio.sleep_forever()

    def _apply(self, pools: Mapping[str, Pool], message: Message) -> None:
        now = trio.current_time()
        for (pool_name, key), until in list(self.held.items()):
            rows = message["pools"].get(pool_name, [])
            down_there = any((str(r[0]), str(r[1])) == key and not r[2] for r in rows)
            if until <= now or down_there:
                del self.held[(pool_name, key)]
        for name, pool in pools.items():
            held = [key for (pool_name, key) in self.held if pool_name == name]
            apply_snapshot({name: pool}, message, held)

    def on_state(self, message: Message) -> None:
        """Apply a snapshot and acknowledge it; not one older than the last (two pushes may cross) nor
        one built before the last command (it may show what the command changed as it was)."""
        seq = integer(message, "seq")
        if seq < self.commanded or (self.state is not None and seq < int(self.state["seq"])):
            self.post({"t": "applied", "seq": message["seq"]})
            return
        if self.balancer is not None:
            self._apply(self.balancer.pools, message)
        self.state = message
        self.state_arrived.set()
        self.state_arrived = trio.Event()
        self.post({"t": "applied", "seq": message["seq"]})

    def _watch_ejections(self) -> None:
        assert self.balancer is not None
        for pool in self.balancer.pools.values():
            pool.on_eject = partial(self._ejected, pool)

    def _ejected(self, pool: Pool, server: Server, reason: str) -> None:
        self.held[(pool.name, key_of(server))] = trio.current_time() + pool.config.eject_for
        self.post({"t": "eject", "pool": pool.name, "server": server.name,
                   "address": str(server.address), "reason": reason})  # fmt: skip

    # --------------------------------------------------------------- control

    def post(self, message: Message) -> None:
        """Queue a message for the supervisor; dropped (and logged) if the queue is full."""
        try:
            self._outbox.send_nowait(message)
        except trio.WouldBlock:
            log.warning("control channel: supervisor not reading; dropped a %r message", message["t"])

    async def send_outgoing(self) -> None:
        async for message in self._outgoing:
            try:
                await self.channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def control(self, nursery: trio.Nursery) -> None:
        """Apply messages until the supervisor closes the channel; then stop (drain)."""
        while True:
            try:
                message = await self.channel.receive()
            except ChannelError as exc:
                log.error("control channel: %s; ignored", exc)
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                message = None
            if message is None:
                log.warning("control channel closed: the supervisor is gone; stopping")
                self.stop()
                return
            try:
                self._dispatch(message, nursery)
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                log.error("control channel: malformed %r message (%s); ignored", message.get("t"), exc)

    def _dispatch(self, message: Message, nursery: trio.Nursery) -> None:
        kind = message["t"]
        if kind == "state":
            self.on_state(message)
        elif kind == "command":
            self.commanded = max(self.commanded, integer(message, "seq"))
            self._changes.send_nowait(message)
        elif kind == "config":
            self._changes.send_nowait(message)
        elif kind == "ask":
            self.post({"t": "answer", "id": message["id"], "value": self._answer(str(message["what"]))})
        elif kind == "stop":
            self.stop(now=bool(message.get("now")), delay=bool(message.get("delay", True)))
        else:
            raise ValueError(f"unknown message type {kind!r}")

    def stop(self, *, now: bool = False, delay: bool = True) -> None:
        """Drain (after shutdown_delay unless `delay` is False; again: nothing more), or with `now`
        cut every connection at once."""
        balancer = self.balancer
        if balancer is None:
            return
        if not balancer.draining:
            balancer.shutdown(delay=delay)
        if now:
            balancer.shutdown()  # the second call cancels everything

    def _answer(self, what: str) -> Any:
        balancer = self.balancer
        if balancer is None:
            return None
        if what == "stats":
            return stats(balancer)
        if what == "metrics":
            return prometheus(balancer, worker=str(self.id))  # process_* labelled: not added up
        if what == "ready":
            return balancer.is_ready()
        raise ValueError(f"unknown question {what!r}")

    async def apply_changes(self) -> None:
        """Carry out commands and reloads one at a time, in the order the supervisor sent them."""
        async for message in self._changes_due:
            if message["t"] == "config":
                await self._reload(message)
            else:
                await self._command(message)

    async def _command(self, message: Message) -> None:
        """Apply one operator command as the supervisor's view did; confirm it (or say why not)."""
        assert self.balancer is not None
        seq = message["seq"]
        try:
            await self.balancer.command(decode_command(message["command"]))
        except (CommandError, KeyError) as exc:
            log.error("control channel: command %s not applied: %s", seq, exc)
            self.post({"t": "done", "seq": seq, "error": str(exc)})
            return
        self.post({"t": "done", "seq": seq})

    async def _reload(self, message: Message) -> None:
        assert self.balancer is not None
        try:
            config = worker_config(message)
            self.inherited.update(message.get("inherited", {}))
            await self.balancer.apply_config(config)
        except (AnubisError, KeyError, TypeError, ValueError) as exc:
            log.error("reload not applied: %s", exc)
            self.post({"t": "reloaded", "id": message.get("id"), "ok": False, "error": str(exc)})
            return
        self._watch_ejections()
        self.post({"t": "reloaded", "id": message.get("id"), "ok": True})

    def restore(self, message: Message) -> None:
        """Apply the commands in effect that came with the config, before this worker serves."""
        assert self.balancer is not None
        items = message.get("commands", [])
        commands = []
        for item in items if isinstance(items, list) else ():
            try:
                commands.append(decode_command(item))
            except CommandError as exc:
                log.error("control channel: a command in effect is not valid (%s); skipped", exc)
        self.balancer.restore(commands, "the supervisor's commands in effect")
        seq = message.get("seq", 0)
        self.commanded = seq if isinstance(seq, int) and not isinstance(seq, bool) else 0


async def run_worker(channel: Channel, worker_id: int, *, own_logging: bool = True) -> None:
    """Receive the config, serve it until stopped, drain, return; the channel is closed on return.

    `own_logging` lets the config's log level and format take over this
    process's logging (a test running a worker in its own process says no).
    """
    async with channel:
        first = await channel.receive()
        if first is None or first.get("t") != "config":
            raise AnubisError("the supervisor sent no config")
        config = worker_config(first)
        if own_logging:
            configure_logging(str(first.get("log_level", "info")), config.settings.log_format, worker_id)
        worker = Worker(channel, worker_id, first.get("inherited", {}))
        balancer = worker.make_balancer(config)
        worker.restore(first)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.control, nursery)
                nursery.start_soon(worker.apply_changes)
                nursery.start_soon(worker.send_outgoing)
                nursery.start_soon(_stop_on_signals, signals, worker)
                await nursery.start(balancer.run)
                settle()
                worker.post({"t": "ready", "pid": os.getpid()})
                await balancer.stopped.wait()
                nursery.cancel_scope.cancel()


async def _stop_on_signals(signals: Any, worker: Worker) -> None:
    """SIGTERM drains, however often it comes: a service manager may signal the whole group
    along with the supervisor, whose own stop message then must not cut connections."""
    async for _ in signals:
        log.info("received SIGTERM")
        worker.stop()


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); False if it already has."""
    return set_death_signal(signal.SIGTERM, parent_pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anubis-worker", description="internal: one worker process")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # `systemctl kill -s USR2` reaches the whole group
    if not die_with_parent(args.parent_pid):
        return 1
    configure_logging("info", "text", args.worker_id)
    try:
        trio.run(_main, args.control_fd, args.worker_id)
    except BaseException as exc:
        error = _find_error(exc)
        if error is None:
            raise
        log_fatal(str(error))
        return 1
    return 0


def _find_error(exc: BaseException) -> AnubisError | None:
    """The first AnubisError in `exc`, looking through exception groups."""
    if isinstance(exc, AnubisError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _find_error(inner)) is not None:
            return found
    return None


async def _main(control_fd: int, worker_id: int) -> None:
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))
    channel = Channel(trio.SocketStream(sock))
    async with channel.stream:
        await run_worker(channel, worker_id)


if __name__ == "__main__":
    raise SystemExit(main())
