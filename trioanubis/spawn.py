"""Replicas as children: a pool that runs its own servers, restarts them, and rolls them on change.

Theory of operation: a pool with a `[pools.NAME.spawn]` table gets a
`Spawner`, run in a scope of its own under the root nursery (apart from the
pool's health checks, so a reload that changes the checks does not restart
the replicas). Each replica is a child process on a free port of its own
(with `ports`, as a process manager's port base: the lowest port of that
range that no other replica holds and nothing listens on; else one the
kernel picks), and a `Server` of the pool at that address, health-checked
like any other:

- A supervisor task per replica starts the process, forwards its output
  (stdout and stderr, one pipe) line by line to the log prefixed with its
  name (a reader task; a line is cut at `MAX_LINE` bytes), waits for it to
  exit and starts it again on the same port after a backoff that doubles
  from `FIRST_BACKOFF` to `MAX_BACKOFF` (back to the first after a run of
  `STABLE_RUN`); on a new port, with a new server in the pool, if another
  program has bound that port meanwhile (its checks would pass there). The
  moment it sees the process exit it marks the server down through the
  pool, so no client is sent to a port nobody listens on (rather than
  waiting for `eject_after` refused connects), and holds it down until the
  restart (`Server.process_down`: whatever answers on the port meanwhile is
  not the replica); the server's health check brings it back once the new
  process answers (with `check = "none"`, the new process accepting a
  connection does).
- Logging: what needs attention is a WARNING (a replica that exited, one
  that ignored SIGTERM) or an ERROR (a roll stopped); a rolling restart's
  routine steps are INFO.
- Stopping a replica is cancelling its supervisor: in a shielded `finally`
  it sends SIGTERM to the replica's process group, SIGKILL after
  `stop_grace`, and waits. When the balancer stops, the root nursery is
  cancelled after the drain, so the replicas serve until the last
  connection ends and are then stopped this way.
- No orphans when the balancer is killed outright: each replica leads a
  process group of its own (so a stop reaches what it started, and the
  terminal's Ctrl-C reaches only the balancer, which then stops them in
  order), and on Linux it asks the kernel for SIGKILL when its parent dies
  (`PR_SET_PDEATHSIG`, through ctypes, decided at run time). The kernel ties
  that to the *thread* that forked, and Trio forks in a worker thread that
  exits after 10 s idle; so replicas are forked from the event loop's own
  thread, which costs the loop a few milliseconds per start.
- A rolling restart (on a change of the `watch` files, or of the spawn
  table at reload) replaces replicas one at a time: start the new one, wait
  until it listens and its health check passes (`start_timeout`), drain the
  old one (no new connections; open ones get `drain_timeout`), stop it. A
  replica that does not become healthy stops the roll: it is stopped, the
  old ones keep serving, and the failure is logged and counted.

Watching is polling: every `WATCH_INTERVAL` the modification times of the
files the patterns match are read in a worker thread (no new dependency,
and a slow disk never blocks the loop).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Final, final

import trio

from trioanubis.children import set_death_signal, wait_exit
from trioanubis.config import Address, ServerConfig, SpawnConfig
from trioanubis.errors import ConnectFailed
from trioanubis.pool import Pool, Server
from trioanubis.proxy.connect import open_server_socket

log = logging.getLogger("trioanubis.spawn")

# The `source` of a replica's Server: reload keeps these, as it keeps discovered ones.
SPAWN_SOURCE: Final = "spawn"
# Restart backoff: quick for a crash during development, at most one start
# every 10 s for a replica that cannot start at all.
FIRST_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 10.0
# A replica that ran this long before exiting was stable: its backoff starts over.
STABLE_RUN: Final = 10.0
# A line of a replica's output longer than this is logged in pieces (bounded memory).
MAX_LINE: Final = 8192
# How often a starting replica is tried for listening: it has no other way to tell us.
LISTEN_POLL: Final = 0.05
# How often watched files are looked at, and how long a change must settle
# before a roll (an editor saving several files is one change).
WATCH_INTERVAL: Final = 0.5
WATCH_SETTLE: Final = 0.3
# After a replica is set draining, connects picked before that may still be
# completing; they finish well within this on a local machine.
DRAIN_SETTLE: Final = 0.2
# Directories never worth watching.
SKIPPED_DIRS: Final = frozenset({".git", "__pycache__", ".venv", "node_modules", ".mypy_cache"})
# The ports of every replica not yet stopped for good, whatever its pool (and balancer) in this
# process: two pools given overlapping ranges must not be given one port. A probe cannot tell: the
# other pool's replica may not listen yet (a roll of both) or be between restarts, and a pool whose
# replica cannot bind would then send its clients to the other pool's app, which passes its checks.
HELD_PORTS: Final[set[int]] = set()
# How many ports the system picks before giving up on one no replica holds.
PICK_TRIES: Final = 16



@final
class Replica:
    """One child process and the pool server at its address."""

    __slots__ = ("ended", "name", "pid", "port", "restarts", "scope", "server")

    def __init__(self, name: str, port: int, server: Server) -> None:
        self.name = name
        self.port = port
        self.server = server
        self.pid = 0  # of the running process; 0 between runs
        self.restarts = 0
        self.scope = trio.CancelScope()
        self.ended = trio.Event()  # its supervisor has stopped the process for good


@final
class Spawner:
    """Runs, restarts and rolls the replicas of one pool."""

    def __init__(self, pool: Pool, config: SpawnConfig, drain_timeout: float) -> None:
        self.pool = pool
        self.config = config
        self.drain_timeout = drain_timeout
        self.replicas: list[Replica] = []
        self.rolls = 0  # completed
        self.roll_failures = 0
        self.last_roll_seconds = 0.0
        self.rolling = False
        self._serial = 0
        self._requests, self._queue = trio.open_memory_channel[str](1)
        self._nursery: trio.Nursery | None = None

    def request_roll(self, reason: str) -> None:
        """Ask for a rolling restart (coalesced with one already pending)."""
        with contextlib.suppress(trio.WouldBlock):
            self._requests.send_nowait(reason)

    def apply(self, config: SpawnConfig, drain_timeout: float) -> None:
        """A reload: a changed spawn table takes effect through a roll."""
        self.drain_timeout = drain_timeout
        if config != self.config:
            self.config = config
            self.request_roll("the spawn table changed")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the replicas, report started() once they listen (or start_timeout), roll on request."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            fresh = [self._launch() for _ in range(self.config.replicas)]
            with trio.move_on_after(self.config.start_timeout):
                for replica in fresh:
                    await _wait_listening(replica)
            self._join(fresh)
            await nursery.start(watch_files, lambda: self.config.watch, self.request_roll)
            task_status.started()
            async for reason in self._queue:
                await self.roll(reason)

    # ------------------------------------------------------------ replicas

    def _launch(self) -> Replica:
        """A new replica on a free port, its supervisor started; not in the pool yet."""
        assert self._nursery is not None
        self._serial += 1
        name = f"{self.pool.name}-{self._serial}"
        port = self._port_for(name)
        replica = Replica(name, port, self._server_at(name, port))
        HELD_PORTS.add(port)
        self._nursery.start_soon(self._supervise, replica, self.config)
        return replica

    def _server_at(self, name: str, port: int, *, moved: bool = False) -> Server:
        """The pool's server for replica `name` on `port`: up from the start only without checks,
        and then only for a new replica (joined once it listens); a moved one is put back once its
        restarted process listens (`_readmit_when_listening`), as after any restart."""
        host = self.config.host
        return Server(ServerConfig(Address(host, port), name), source=SPAWN_SOURCE,
                      healthy=self.pool.config.health.check == "none" and not moved,
                      sockaddrs=[(_family(host), (host, port))])  # fmt: skip

    def _move_if_taken(self, replica: Replica) -> None:
        """Before a restart: another program may have bound the replica's port while nothing
        listened there. The replica could not bind it, and its checks would pass on that program,
        sending it the pool's clients; so the replica moves to a new port, with a new server."""
        if port_is_free(self.config.host, replica.port):
            return
        old_port, old_server = replica.port, replica.server
        replica.port = self._port_for(replica.name)
        HELD_PORTS.discard(old_port)
        HELD_PORTS.add(replica.port)
        replica.server = self._server_at(replica.name, replica.port, moved=True)
        if old_server in self.pool.servers:
            self.pool.remove(old_server)
            self.pool.add([replica.server])
        log.warning("replica %s: another program listens on its port %d now; it restarts on %d",
                    replica.name, old_port, replica.port)  # fmt: skip

    def _port_for(self, name: str) -> int:
        """The port of a new replica: the kernel's choice, or the lowest in `ports` that no replica
        holds and nothing listens on now. With none such, one the system picks (a warning): never a
        port something listens on, since the replica's checks would pass on that program and the
        pool would send its clients there."""
        host, ports = self.config.host, self.config.ports
        if ports is None:
            return _unheld_free_port(host)
        for port in range(ports[0], ports[1] + 1):
            if port not in HELD_PORTS and port_is_free(host, port):
                return port
        log.warning("pool %s: no port in %d-%d is free (replicas hold or programs listen on every "
                    "one); replica %s is given one the system picks", self.pool.name, ports[0],
                    ports[1], name)  # fmt: skip
        return _unheld_free_port(host)

    def _join(self, replicas: list[Replica]) -> None:
        self.replicas.extend(replicas)
        self.pool.add(r.server for r in replicas)

    async def _supervise(self, replica: Replica, config: SpawnConfig) -> None:
        """Run `replica` until cancelled, restarting it with backoff; stop it for good in finally."""
        backoff = FIRST_BACKOFF
        with replica.scope:
            try:
                while True:
                    started = trio.current_time()
                    code = await self._run_once(replica, config)
                    self._take_out(replica, code)
                    ran = trio.current_time() - started
                    backoff = FIRST_BACKOFF if ran >= STABLE_RUN else backoff
                    log.warning("replica %s exited (%s) after %.1fs; restarting in %gs",
                                replica.name, _describe_exit(code), ran, backoff)  # fmt: skip
                    replica.restarts += 1
                    await trio.sleep(backoff)
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    self._move_if_taken(replica)
            finally:
                replica.pid = 0
                HELD_PORTS.discard(replica.port)
                replica.ended.set()

    def _take_out(self, replica: Replica, code: int | None) -> None:
        """The process is gone: no new connection is sent to its port from now on, and until it
        restarts no check brings the server back (another program may answer on the port). Its
        health check brings it back once the restarted process answers (with check = "none", the
        restarted process listening does, `_readmit_when_listening`)."""
        replica.server.process_down = True
        if replica.server in self.pool.servers:
            self.pool.mark_down(replica.server, f"its process exited ({_describe_exit(code)})")

    async def _readmit_when_listening(self, replica: Replica, pid: int) -> None:
        """check = "none": put a restarted replica back once its process `pid` accepts connections."""
        with trio.move_on_after(self.config.start_timeout):
            while replica.pid == pid:
                with contextlib.suppress(ConnectFailed):
                    (await open_server_socket(replica.server, 1.0)).close()
                    break
                await trio.sleep(LISTEN_POLL)
        if replica.pid == pid and replica.server in self.pool.servers:
            self.pool.mark_up(replica.server, "its restarted process listens")

    async def _run_once(self, replica: Replica, config: SpawnConfig) -> int | None:
        """Start the process once and wait for it to exit; its exit status (None: could not start)."""
        assert self._nursery is not None
        try:
            popen, output = start_process(config, replica.port)
        except OSError as exc:
            log.error("replica %s: cannot start %s: %s", replica.name, config.command[0],
                      exc.strerror or exc)  # fmt: skip
            return None
        replica.pid = popen.pid
        replica.server.process_down = False
        log.info("replica %s started: pid %d, port %d", replica.name, popen.pid, replica.port)
        self._nursery.start_soon(forward_output, replica.name, output)
        if not replica.server.healthy and self.pool.config.health.check == "none":
            self._nursery.start_soon(self._readmit_when_listening, replica, popen.pid)
        try:
            return await wait_exit(popen)
        finally:
            with trio.CancelScope(shield=True):
                await terminate(popen, config.stop_grace)

    # ---------------------------------------------------------------- roll

    async def roll(self, reason: str) -> bool:
        """Replace every replica one at a time; False (old ones kept) if a new one fails its check."""
        self.rolling = True
        try:
            return await self._roll(reason)
        finally:
            self.rolling = False

    async def _roll(self, reason: str) -> bool:
        started = trio.current_time()
        log.info("pool %s: rolling restart of %d replicas (%s)", self.pool.name,
                 len(self.replicas), reason)  # fmt: skip
        while len(self.replicas) > self.config.replicas:  # the table asked for fewer: first, so the
            await self._retire(self.replicas[-1])  # new range (room for replicas + 1) fits the rest
        for old in list(self.replicas):
            if not await self._replace(old):
                self.roll_failures += 1
                return False
        while len(self.replicas) < self.config.replicas:
            if not await self._add_healthy():
                self.roll_failures += 1
                return False
        self.rolls += 1
        self.last_roll_seconds = trio.current_time() - started
        log.info("pool %s: rolling restart done in %.2fs", self.pool.name, self.last_roll_seconds)
        return True

    async def _replace(self, old: Replica) -> bool:
        if not await self._add_healthy():
            return False
        await self._retire(old)
        return True

    async def _add_healthy(self) -> bool:
        """Start a replica and wait for it to listen and pass its check; stop it if it does not."""
        new = self._launch()
        with trio.move_on_after(self.config.start_timeout):
            await _wait_listening(new)
            self._join([new])
            while not new.server.healthy:
                await self.pool.wait_changed()
            return True
        log.error("pool %s: replica %s did not become healthy within %gs; roll stopped, "
                  "the running replicas keep serving", self.pool.name, new.name,
                  self.config.start_timeout)  # fmt: skip
        await self._stop(new)
        return False

    async def _retire(self, old: Replica) -> None:
        """Drain `old` (no new connections; open ones get drain_timeout), then stop it."""
        self.pool.set_draining(old.server, True)
        await trio.sleep(DRAIN_SETTLE)
        with trio.move_on_after(self.drain_timeout):
            while old.server.active:
                await self.pool.wait_changed()
        await self._stop(old)

    async def _stop(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        if replica.server in self.pool.servers:
            self.pool.remove(replica.server)
        replica.scope.cancel()
        await replica.ended.wait()


async def _wait_listening(replica: Replica) -> None:
    """Return once `replica` accepts a connection, or has exited (unbounded: the caller bounds it)."""
    while not replica.restarts:  # an exit is the supervisor's business: don't wait for it here
        try:
            sock = await open_server_socket(replica.server, 1.0)
        except ConnectFailed:
            await trio.sleep(LISTEN_POLL)
            continue
        sock.close()
        return


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str) -> int:
    """A port nothing listens on now (the replica binds it a moment later)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _unheld_free_port(host: str) -> int:
    """A free port the system picks that no replica holds (one between restarts is not bound)."""
    port = free_port(host)
    for _ in range(PICK_TRIES):
        if port not in HELD_PORTS:
            break
        port = free_port(host)
    return port


def port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on `port` at `host` now (bound as servers bind, with
    SO_REUSEADDR: a port whose last connections linger in TIME_WAIT is free)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


# ------------------------------------------------------------------ processes


def start_process(config: SpawnConfig, port: int) -> tuple[subprocess.Popen[bytes], int]:
    """Fork and exec one replica from this thread; its output pipe's read end is returned with it."""
    command = [arg.replace("{port}", str(port)) for arg in config.command]
    env = {**os.environ, **dict(config.env), "PORT": str(port)}
    read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            command, cwd=config.cwd or None, env=env, stdin=subprocess.DEVNULL, stdout=write_fd,
            stderr=write_fd, start_new_session=True, preexec_fn=_die_with_parent(),
        )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return popen, read_fd


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a preexec_fn asking for SIGKILL when this process dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        if not set_death_signal(signal.SIGKILL, parent):  # the parent died before the request took hold
            os._exit(1)

    return die_with_parent


async def terminate(popen: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, SIGKILL after `grace`, and reap the leader."""
    if popen.poll() is None:
        _signal_group(popen.pid, signal.SIGTERM)
        with trio.move_on_after(grace):
            await wait_exit(popen)
        if popen.poll() is None:
            log.warning("pid %d did not stop within %gs of SIGTERM: SIGKILL", popen.pid, grace)
            _signal_group(popen.pid, signal.SIGKILL)
            await wait_exit(popen)
    _signal_group(popen.pid, signal.SIGKILL)  # whatever it left behind in its group


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "could not start"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


async def forward_output(name: str, fd: int) -> None:
    """Log each line `fd` carries as "NAME | line" until EOF; owns and closes `fd`."""
    stream = trio.lowlevel.FdStream(fd)
    pending = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError):
                data = b""
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            while len(pending) > MAX_LINE:
                lines.append(pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
            _log_lines(name, lines)
    _log_lines(name, [pending] if pending else [])


def _log_lines(name: str, lines: Iterable[bytes]) -> None:
    for line in lines:
        log.info("%s | %s", name, line.rstrip(b"\r").decode(errors="replace"))


# ------------------------------------------------------------------ watching


async def watch_files(
    patterns: Callable[[], Iterable[str]],
    on_change: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_change(reason)` whenever a file the glob `patterns()` match changes, appears or goes.

    started() once the first look is taken: a change after that is seen. The
    patterns are asked for at every look, so a reload that changes them applies at once.
    """
    watched = tuple(patterns())
    last = await _snapshot(watched)
    task_status.started()
    while True:
        await trio.sleep(WATCH_INTERVAL)
        wanted = tuple(patterns())
        now = await _snapshot(wanted)
        if now == last or wanted != watched:  # new patterns (a reload): a new baseline
            watched, last = wanted, now
            continue
        await trio.sleep(WATCH_SETTLE)
        settled = await _snapshot(wanted)
        changed = sorted(set(now.items()) ^ set(last.items()))
        last = settled
        on_change(f"{changed[0][0] if changed else 'a watched file'} changed")


async def _snapshot(patterns: Iterable[str]) -> dict[str, int]:
    patterns = tuple(patterns)
    return await trio.to_thread.run_sync(snapshot, patterns) if patterns else {}


def snapshot(patterns: Iterable[str]) -> dict[str, int]:
    """Path → modification time (ns) of every file the patterns match; a directory means its files."""
    found: dict[str, int] = {}
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=True):
            for file in _files(path):
                with contextlib.suppress(OSError):
                    found[file] = os.stat(file).st_mtime_ns
    return found


def _files(path: str) -> Iterable[str]:
    if not os.path.isdir(path):
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for file in files:
            yield os.path.join(root, file)
