"""The supervisor: with `workers = N` (N > 1), the process that starts and owns the workers.

Theory of operation — the tree `Supervisor.run` builds:

    root nursery
    ├── view: a Balancer with the config's pools and no listeners  app.py
    │   ├── admin endpoint (its router asks the workers)
    │   └── discovery and health checks: the one health view
    ├── pusher: the view's state to every worker, on change and each second
    ├── reloader: SIGHUP / `anubis reload` / --watch, one at a time
    └── workers nursery: one task per worker slot             slot.py
        └── spawn → feed config, commands, state → wait for exit → log → back off → respawn

Start-up binds every listener (sockets.py) before anything else, so a port
in use is reported once, by the supervisor; then the view runs its first
health round; then the workers start, and `task_status.started()` reports the
concrete addresses once every worker is serving.

One health view: only the supervisor probes servers. Each worker gets the
view as `state` snapshots (merge.py) and runs no checks of its own, so a
backend sees one probe stream however many workers there are; slow-start
weights ramp in the view and reach every worker the same. A passive ejection
a worker sees comes up as `eject`, is applied to the view, and so goes down to
every worker with the next snapshot.

The admin endpoint lives here. `/stats` and `/metrics` ask every worker at
request time (nothing is sent while nobody looks, and the answer is as fresh
as the request) and add their counters up; `/readyz` is ready when the view
and every worker are (`?upstream=1`: and the one health view has a server in
every pool). The admin shell (admin.py) screens Host and Origin before this
router sees a request.

In a fleet ([cluster], fleet/) the view runs the fleet task: shared state
from etcd is applied through `command` (so every worker gets it as it gets
the admin's), and membership speaks for the whole instance; each worker
follows its pools' etcd servers itself, as it runs its own DNS discovery.

One authority for runtime state: every change an operator makes is a
command (control.py) that admin.py's route table builds; `command` applies
it to the view (which also writes the state file), then sends it, as one
`command` message whatever the command, to every worker, which applies it
through the same function and confirms; the admin answers 200 once every
running worker has, 503 naming the others. Commands, reloads and a worker's
start take `changes` in turn, so every worker sees them in the view's order,
and a worker that starts gets the commands in effect with its config, before
it serves. Snapshots and commands share one sequence: a worker ignores a
snapshot built before the last command it received, which may still show
what the command changed (a weight, a drain) as it was.

Stop (SIGTERM/SIGINT): every worker is told to stop, accepts on for
`shutdown_delay` (while `/readyz` says 503) and drains within
`drain_timeout`; a worker still running `STOP_GRACE` after that is killed;
the supervisor returns when the last one has exited. A second signal tells
the workers to cut their connections at once. Upgrade (SIGUSR2,
upgrade.py): the supervisor is what upgrades; it hands every held socket
(sockets.py) and its admin endpoint's to the new supervisor, and once that
one's workers all serve, tells its own workers to stop without the delay.
systemd hears from the supervisor only (ops/systemd.py): READY=1 once every
worker serves, RELOADING=1 … READY=1 around a reload, STOPPING=1. Reload: the supervisor reads
and validates the file once; an invalid file, or a listener that cannot be
bound, is rejected here and every worker keeps its config; a valid one is
sent, as the same text, to every worker. A worker that exits on its own is
logged with its status and started again after a backoff (0.5 s doubling to
30 s, back to 0.5 s once a worker has run for a minute); the others and
their connections are not touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, final

import trio

from trioanubis.app import Balancer, run_with_signals
from trioanubis.config import Address, Config, parse_config_text
from trioanubis.control import Command, CommandError, encode_command, named
from trioanubis.errors import AnubisError, ConfigError
from trioanubis.ops import systemd
from trioanubis.ops.admin import (
    OPEN_PATHS,
    PROMETHEUS_TYPE,
    UNAUTHORISED,
    Pending,
    Reply,
    authorised,
    carry_out,
    json_reply,
    ready_reply,
    route,
    upstream_asked,
)
from trioanubis.ops.metrics import prometheus, stats
from trioanubis.pool import Pool, Server
from trioanubis.upgrade import SocketBook, Upgrader, split_admin
from trioanubis.watch import files_read_by, signatures, watch_files
from trioanubis.workers.channel import Message
from trioanubis.workers.merge import snapshot, sum_metrics, sum_stats
from trioanubis.workers.slot import WorkerSlot
from trioanubis.workers.sockets import Holds, reuse_port_balances

log = logging.getLogger("trioanubis.supervisor")

# How often the view is pushed even when nothing changed: a worker whose own
# discovery found a server first gets its state within this.
PUSH_INTERVAL: Final = 1.0


# Sockets passed to this process (systemd, an upgrade): (name, socket).
Inherited = Sequence[tuple[str, socket.socket]]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def worker_count(setting: int) -> int:
    """`workers` as configured (0 is "auto") → a number of processes."""
    return usable_cores() if setting == 0 else setting


def read_config(path: str) -> tuple[str, Config]:
    """The config file's text and what it says; ConfigError naming the file otherwise."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    return text, parse_config_text(text, path)


def view_config(config: Config) -> Config:
    """The supervisor's own Balancer: the pools, the admin, the pid file; no listeners."""
    return dataclasses.replace(config, listeners={})


@final
class Supervisor:
    """N worker processes behind one set of listeners, one health view and one admin endpoint."""

    def __init__(self, config: Config, text: str, *, count: int, log_level: str = "info",
                 watch: bool = False, inherited: Inherited = ()) -> None:  # fmt: skip
        self.config = config
        self.text = text
        self.log_level = log_level
        self.watch = watch
        self._files_seen = signatures(self._watched()) if watch else {}
        admin_sockets, listener_sockets = split_admin(inherited)
        self.holds = Holds(reuse_port_balances(), count, listener_sockets)
        self.book = SocketBook(admin_sockets, view_config(config))  # the admin endpoint's sockets
        self.view = Balancer(view_config(config), open_admin=self.book.open_admin)
        if self.view.admin is not None:
            self.view.admin.router = self.route
        self.view.apply_shared = functools.partial(self.command, publish=False)  # etcd's, to every worker
        self.slots = [WorkerSlot(self, k) for k in range(1, count + 1)]
        self.stopping = False
        self.upgrader = Upgrader(self._handover, self.hand_over, lambda: self.stopping)
        self.stop_requested = trio.Event()
        # One change at a time, in one order everywhere: a command, a reload, a worker's start.
        self.changes = trio.Lock()
        self._seq = 0  # state snapshots and commands share it: a snapshot older than a command is stale
        self._root: trio.Nursery | None = None
        self._reload_requests, self._reload_queue = trio.open_memory_channel[str](1)

    @property
    def path(self) -> str:
        return str(self.config.source)

    # ------------------------------------------------------------------ run

    async def run(
        self, *, task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, check, start the workers; started() with the listeners' addresses once all serve."""
        self.holds.commit(await self.holds.prepare(self.config.listeners), self.config)
        try:
            async with trio.open_nursery() as root:
                self._root = root
                await root.start(self.view.run)
                root.start_soon(self._push_loop)
                root.start_soon(self._reload_loop)
                if self.watch:
                    root.start_soon(watch_files, self._watched, self._files_seen, self.request_reload)
                async with trio.open_nursery() as workers:
                    for slot in self.slots:
                        workers.start_soon(slot.run)
                    for slot in self.slots:
                        await slot.ready.wait()
                    binds = self.holds.concrete_binds(self.config)
                    log.info("%d workers serving (listeners: %s)", len(self.slots), ", ".join(
                        f"{name} {held.mode.replace('_', ' ')}" for name, held in self.holds.held.items()))
                    task_status.started({n: _address(b) for n, b in binds.items()})
                self.view.shutdown(delay=False)  # the workers had the shutdown_delay
                await self.view.stopped.wait()
                root.cancel_scope.cancel()
        finally:
            self.holds.close()

    def stop(self, *, delay: bool = True) -> None:
        """Tell every worker to drain (after shutdown_delay unless `delay` is False); a second call
        tells them to cut their connections now."""
        now = self.stopping
        if now:
            log.warning("second stop request: workers reset every connection now")
        self.stopping = True
        self.stop_requested.set()
        for slot in self.slots:
            if slot.channel is not None and self._root is not None:
                self._root.start_soon(slot.send, {"t": "stop", "now": now, "delay": delay})

    def _handover(self) -> list[tuple[str, int]]:
        """What an upgrade passes on: every held listener socket, and the admin endpoint's."""
        return self.holds.handover() + self.book.handover({})

    def hand_over(self) -> None:
        """A new supervisor serves: close the admin endpoint, and the workers stop accepting now."""
        self.view.stop_admin()
        self.stop(delay=False)

    # ----------------------------------------------------------- health view

    def config_message(self) -> Message:
        """The config for a worker; the slot adds the sockets its process inherited."""
        return {"t": "config", "text": self.text, "source": self.path,
                "binds": self.holds.concrete_binds(self.config), "log_level": self.log_level}  # fmt: skip

    def state_message(self) -> Message:
        return snapshot(self.view.pools, self._seq)

    def runtime_message(self) -> Message:
        """What a starting worker applies before it serves: the commands in effect, as of `seq`."""
        return {"commands": [encode_command(c) for c in self.view.control.in_effect()], "seq": self._seq}

    async def push(self) -> int:
        """Send the view to every worker; returns the snapshot's seq."""
        self._seq += 1
        message = self.state_message()
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                if slot.channel is not None:
                    nursery.start_soon(slot.send, message)
        return self._seq

    async def _push_loop(self) -> None:
        while True:
            with trio.move_on_after(PUSH_INTERVAL):
                await self._any_pool_changed()
            await self.push()

    async def _any_pool_changed(self) -> None:
        async with trio.open_nursery() as nursery:
            for pool in self.view.pools.values():
                nursery.start_soon(_cancel_when_changed, pool, nursery.cancel_scope)

    def ejected(self, worker_id: int, message: Message) -> None:
        """A worker ejected a server: take it out of the view, hence out of every worker."""
        pool = self.view.pools.get(str(message["pool"]))
        server = None if pool is None else pool.find(str(message["server"]))
        if pool is None or server is None or str(server.address) != str(message["address"]):
            return
        pool.mark_down(server, f"ejected by worker {worker_id}: {message.get('reason', '')}")

    # ----------------------------------------------------------------- admin

    async def route(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                    token: str) -> Reply:  # fmt: skip
        """The admin API across the workers; everything else is `admin.route` on the view."""
        path = target.split("?", 1)[0]
        if path not in OPEN_PATHS and not authorised(token, headers):
            return UNAUTHORISED
        if method in ("GET", "HEAD") and path == "/stats":
            return json_reply(200, await self.stats())
        if method in ("GET", "HEAD") and path == "/metrics":
            return Reply(200, PROMETHEUS_TYPE, (await self.metrics()).encode())
        if method in ("GET", "HEAD") and path == "/readyz":
            upstream = upstream_asked(target)
            return upstream if isinstance(upstream, Reply) else ready_reply(await self.ready(upstream))
        answer = route(self.view, method, target, headers, body, token)
        return await carry_out(answer, self.command) if isinstance(answer, Pending) else answer

    async def command(self, command: Command, *, publish: bool = True) -> Server:
        """Carry out an operator's command on the view, then in every worker (one `command` message,
        whatever the command); the view's server once every running worker confirmed it. In a fleet
        the view queues it for etcd unless `publish` is False (it came from etcd: fleet/fleet.py).

        Raises CommandError: as `Balancer.command` does when the view refuses it
        (nothing is sent then), and 503 naming the workers that did not confirm
        within ASK_TIMEOUT or refused it (the view and the others have it).
        """
        async with self.changes:
            server = await self.view.command(command, publish=publish)
            self._seq += 1  # after the change: a snapshot built before it is older than this
            seq = self._seq
            message = {"t": "command", "seq": seq, "command": encode_command(named(command, server.name))}
            async with trio.open_nursery() as nursery:
                for slot in self.slots:
                    if slot.configured:
                        nursery.start_soon(slot.deliver, message)
        await self._confirmed(seq)
        return server

    async def _confirmed(self, seq: int) -> None:
        """Wait for every worker's word on command `seq`; CommandError (503) naming the others."""
        results: dict[int, str | None] = {}

        async def wait(slot: WorkerSlot) -> None:
            results[slot.id] = await slot.wait_done(seq)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(wait, slot)
        failed = [f"worker {wid} {why}" for wid, why in sorted(results.items()) if why is not None]
        if failed:
            raise CommandError(f"applied here, but {'; '.join(failed)}", 503)

    async def ask_all(self, what: str) -> list[tuple[WorkerSlot, Any]]:
        answers: list[tuple[WorkerSlot, Any]] = []

        async def ask(slot: WorkerSlot) -> None:
            answers.append((slot, await slot.request({"t": "ask", "what": what}) if slot.serving else None))

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        return sorted(answers, key=lambda a: a[0].id)

    async def ready(self, upstream: bool = False) -> bool:
        """This supervisor and every worker take clients; with `upstream`, the view has a server per pool."""
        if not self.view.is_ready() or self.stopping or (upstream and not self.view.has_upstream()):
            return False
        return all(answer is True for _, answer in await self.ask_all("ready"))

    async def stats(self) -> dict[str, Any]:
        answers = await self.ask_all("stats")
        docs = [(slot.id, doc) for slot, doc in answers if isinstance(doc, dict)]
        out = sum_stats(stats(self.view), docs)
        out["ready"] = out["ready"] and len(docs) == len(self.slots) and not self.stopping
        out["draining"] = self.stopping
        out["workers"] = [self._worker_row(slot, doc if isinstance(doc, dict) else None)
                          for slot, doc in answers]  # fmt: skip
        return out

    @staticmethod
    def _worker_row(slot: WorkerSlot, doc: dict[str, Any] | None) -> dict[str, Any]:
        row: dict[str, Any] = {"id": slot.id, "pid": slot.pid, "serving": slot.serving,
                               "restarts": slot.restarts, "answered": doc is not None}  # fmt: skip
        if doc is not None:
            row["active"] = doc.get("active", 0)
            row["accepted"] = sum(int(x.get("accepted", 0)) for x in doc.get("listeners", []))
        return row

    async def metrics(self) -> str:
        answers = await self.ask_all("metrics")
        mine = prometheus(self.view, worker="supervisor")  # its process_* lines labelled as the workers'
        texts = [mine, *(text for _, text in answers if isinstance(text, str))]
        lines = ["# HELP anubis_worker_up 1 if a worker process answered, else 0.",
                 "# TYPE anubis_worker_up gauge"]  # fmt: skip
        lines += [f'anubis_worker_up{{worker="{s.id}"}} {int(isinstance(t, str))}' for s, t in answers]
        lines += ["# HELP anubis_worker_restarts_total Times a worker process was started again.",
                  "# TYPE anubis_worker_restarts_total counter"]  # fmt: skip
        lines += [f'anubis_worker_restarts_total{{worker="{s.id}"}} {s.restarts}' for s, _ in answers]
        return sum_metrics(texts) + "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- reload

    def request_reload(self, reason: str) -> None:
        with contextlib.suppress(trio.WouldBlock):
            self._reload_requests.send_nowait(reason)

    async def _reload_loop(self) -> None:
        async for reason in self._reload_queue:
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
            applied = await self.reload(reason)
            systemd.notify("READY=1", f"STATUS=reload {'applied' if applied else 'not applied everywhere'}")

    async def reload(self, reason: str) -> bool:
        """Validate the file once; if it is good, apply it to the view and to every worker."""
        log.info("reloading %s (%s)", self.path, reason)
        try:
            text, config = await trio.to_thread.run_sync(read_config, self.path)
            new = await self.holds.prepare(config.listeners)
        except AnubisError as exc:
            self.view.reload_failures += 1
            log.error("reload rejected, every worker keeps the running config: %s", exc)
            return False
        if worker_count(config.settings.workers) != len(self.slots):
            log.warning("reload: settings.workers takes effect at the next restart; still %d workers",
                        len(self.slots))  # fmt: skip
        self.holds.commit(new, config)
        async with self.changes:  # commands and reloads reach every worker in the view's order
            self.config, self.text = config, text  # a worker starting from now on gets this one
            await self.view.apply_config(view_config(config))
            results = await self._send_config()
        await self.push()
        applied = sum(1 for r in results if isinstance(r, dict) and r.get("ok"))
        log.info("reload applied in %d of %d workers", applied, len(self.slots))
        return applied == len(self.slots)

    async def _send_config(self) -> list[Any]:
        """The new config to every serving worker; their answers."""
        message = self.config_message()
        results: list[Any] = []

        async def send(slot: WorkerSlot) -> None:
            results.append(await slot.request({**message, "inherited": slot.inherited()}) if slot.serving
                           else {"ok": True})  # fmt: skip

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(send, slot)
        return results

    def _watched(self) -> list[str]:
        """What --watch looks at: the config file and the files the running config read."""
        return [self.path, *files_read_by(self.config)]


async def _cancel_when_changed(pool: Pool, scope: trio.CancelScope) -> None:
    await pool.wait_changed()
    scope.cancel()


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))


async def run_supervised(
    supervisor: Supervisor,
    *,
    task_status: trio.TaskStatus[Mapping[str, Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `supervisor`: SIGTERM/SIGINT stop the workers (a second: at once), SIGHUP reloads them,
    SIGUSR2 upgrades."""
    await run_with_signals(supervisor.run, supervisor.request_reload, supervisor.stop,
                           upgrade=supervisor.upgrader.upgrade, task_status=task_status)  # fmt: skip
