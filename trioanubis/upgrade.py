"""Upgrade without refusing a connection: the listening sockets go to the new executable, then we step down.

Theory of operation — SIGUSR2 (`anubis upgrade` sends it to the pid file's
process), as nginx's binary upgrade:

1. The running process starts the executable on disk now, with its own
   command line (`sys.executable` + `sys.orig_argv`), as a child. The
   child inherits every listening socket (the listeners', and the admin
   endpoint's under the name "anubis.admin") through the socket-activation
   protocol (ops/systemd.py): descriptors 3, 4, … with LISTEN_FDS and
   LISTEN_FDNAMES (the listener names). LISTEN_PID must be the child's own
   pid, known only after the fork, so the child is `/bin/sh -c 'export
   LISTEN_PID=$$; exec "$@"'` in front of the command: the shell's pid is the
   one the command keeps. One more descriptor, named by ANUBIS_UPGRADE_FD,
   is the write end of a pipe.
2. The child starts as any `anubis run` does, except that it adopts the
   passed sockets instead of binding (`SocketBook`; the worker supervisor's
   `Holds`), and writes "READY=1" to the pipe once it serves (instead of
   telling systemd: its predecessor does that, below). Both processes now
   accept from the same sockets (the same kernel objects: one accept queue),
   so nothing is refused and nothing queued is lost.
3. The old process waits for that line, at most UPGRADE_TIMEOUT. If the
   child exits first, or the time runs out (the child is then stopped), the
   upgrade failed: it is logged with the reason (the child's own log lines,
   on the same stderr, say more) and the old process keeps serving as if
   nothing happened. Otherwise it tells systemd `MAINPID=<child>` (so a
   Type=notify unit follows the new process), closes its admin endpoint,
   stops accepting (no shutdown_delay: the new process already accepts),
   drains within drain_timeout and exits. Closing its own descriptors does
   not close the sockets, which the child holds. The child writes its pid to
   the pid file once it listens.

Not for PID 1 in a container: the container ends with its PID 1, so roll the
image there instead. Unix only (fork, SIGUSR2, /bin/sh).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, final

import trio

from trioanubis.config import Address, Config
from trioanubis.errors import AnubisError
from trioanubis.ops import systemd
from trioanubis.ops.admin import open_admin_listeners
from trioanubis.ops.systemd import ADMIN_FD_NAME, LISTEN_FDS_START, assign
from trioanubis.proxy.listener import open_listen_socket

if TYPE_CHECKING:
    from trioanubis.app import Balancer

log = logging.getLogger("trioanubis.upgrade")

# The variable naming the descriptor the new process reports "READY=1" on.
UPGRADE_FD_ENV: Final = "ANUBIS_UPGRADE_FD"
# How long the new process gets to serve: its start-up includes resolving names and every pool's
# first health round (a check times out in seconds), so a minute is generous and still bounded.
UPGRADE_TIMEOUT: Final = 60.0
# After a failed upgrade's SIGTERM, how long the new process gets before SIGKILL (it may hold a
# connection it accepted before reporting ready; it drains like any stopping process).
STOP_GRACE: Final = 30.0
# The most a new process may write on the pipe; more is not a report of ours.
MAX_REPORT: Final = 4096
READY: Final = b"READY=1"
# In front of the new command: LISTEN_PID must be the pid the command runs as, known after fork.
WRAPPER: Final = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


class UpgradeFailed(AnubisError):
    """The new process did not take over; the old one serves on."""


# --------------------------------------------------------------- the sockets


@final
class SocketBook:
    """A single process's listening sockets: adopted (systemd, a predecessor) or bound, kept to hand on.

    `open_listener` and `open_admin` are the Balancer's `open_socket` and
    `open_admin` hooks: an adopted socket is given to the listener whose name
    it carries (or, unnamed, by order), once; anything else is bound as usual.
    The hook learns only the bind it opens, so two listeners written with the
    same bind (port 0 twice) take theirs in the order they open, which is the
    config's.
    """

    def __init__(self, inherited: Sequence[tuple[str, socket.socket]], config: Config) -> None:
        self._waiting: dict[Address, list[socket.socket]] = {}  # by configured bind, in listener order
        self._admin_waiting: list[socket.socket] = []
        self._listening: dict[tuple[str, int], socket.socket] = {}  # by the address it is bound to
        self._admin: list[trio.socket.SocketType] = []
        taken, unused = assign(list(config.listeners), [name for name, _ in inherited], (ADMIN_FD_NAME,))
        for name, listener in config.listeners.items():  # in config order: the order they open
            socks = [inherited[i][1] for i in taken.get(name, [])]
            if socks:
                self._waiting.setdefault(listener.bind, []).append(socks[0])
                close_unused(socks[1:], f"listener {name} takes one socket")
        admin_indices = [] if ADMIN_FD_NAME in config.listeners else taken.get(ADMIN_FD_NAME, [])
        admin = [inherited[i][1] for i in admin_indices]  # (a listener of that name took them above)
        if config.admin is not None:
            self._admin_waiting = admin
        else:
            close_unused(admin, "the config has no [admin]")
        close_unused([inherited[i][1] for i in unused], "no listener of the config has its name")

    async def open_listener(self, bind: Address, backlog: int) -> socket.socket:
        """The adopted socket for `bind`'s listener, else a new one."""
        waiting = self._waiting.get(bind)
        sock = waiting.pop(0) if waiting else None
        if sock is None:
            sock = await open_listen_socket(bind, backlog)
        else:
            _log_adopted(sock, bind)
        self._listening[sock.getsockname()[:2]] = sock
        return sock

    async def open_admin(self, bind: Address) -> list[trio.SocketListener]:
        """The adopted admin sockets, else new ones."""
        if self._admin_waiting:
            for sock in self._admin_waiting:
                _log_adopted(sock, bind, "admin")
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in self._admin_waiting]
            self._admin_waiting = []
        else:
            listeners = await open_admin_listeners(bind)
        self._admin = [listener.socket for listener in listeners]
        return listeners

    def handover(self, bound: Mapping[str, Address | None]) -> list[tuple[str, int]]:
        """(name, descriptor) of every socket still listening: the listeners' (by their bound
        address) and the admin endpoint's."""
        fds = []
        for name, address in bound.items():
            sock = None if address is None else self._listening.get((address.host, address.port))
            if sock is not None and sock.fileno() >= 0:
                fds.append((name, sock.fileno()))
        fds += [(ADMIN_FD_NAME, sock.fileno()) for sock in self._admin if sock.fileno() >= 0]
        return fds


def _log_adopted(sock: socket.socket, bind: Address, what: str = "listener") -> None:
    host, port = sock.getsockname()[:2]
    log.info("%s bind %s: taking the inherited socket on %s (descriptor %d)", what, bind,
             Address(host, port), sock.fileno())  # fmt: skip


def split_admin(inherited: Sequence[tuple[str, socket.socket]],
                ) -> tuple[list[tuple[str, socket.socket]], list[tuple[str, socket.socket]]]:  # fmt: skip
    """The admin endpoint's passed sockets, and the others (the worker supervisor keeps them apart)."""
    admin = [(name, sock) for name, sock in inherited if name == ADMIN_FD_NAME]
    return admin, [(name, sock) for name, sock in inherited if name != ADMIN_FD_NAME]


def close_unused(socks: Sequence[socket.socket], why: str) -> None:
    """Close inherited sockets no listener takes (logged: a unit and a config that disagree)."""
    for sock in socks:
        try:
            where = str(sock.getsockname())
        except OSError:
            where = "?"
        log.warning("inherited socket %s closed: %s", where, why)
        sock.close()


# ------------------------------------------------------------- the old side


@final
class Upgrader:
    """SIGUSR2 in a running process: start the successor on our sockets, then step down."""

    def __init__(self, sockets: Callable[[], list[tuple[str, int]]], step_down: Callable[[], None],
                 stopping: Callable[[], bool]) -> None:  # fmt: skip
        self.sockets = sockets  # (name, descriptor) to hand over, taken when the upgrade starts
        self.step_down = step_down  # stop accepting and drain: the successor serves
        self.stopping = stopping
        self.busy = False

    async def upgrade(self) -> None:
        """One upgrade; failures are logged, and this process then serves on."""
        if self.busy or self.stopping():
            log.warning("received SIGUSR2: %s; ignored", "an upgrade is under way" if self.busy
                        else "this process is stopping")  # fmt: skip
            return
        self.busy = True
        try:
            log.info("received SIGUSR2: starting the new executable on %s", " ".join(successor_argv()))
            pid = await start_successor(self.sockets())
        except (UpgradeFailed, OSError) as exc:  # OSError: out of descriptors for the pipe, say
            log.error("upgrade failed, this process (pid %d) serves on: %s", os.getpid(), exc)
            return
        finally:
            self.busy = False
        if self.stopping():  # a stop came while the new process started: it stops too
            log.warning("upgrade: this process was told to stop meanwhile; stopping the new one (pid %d) "
                        "as well", pid)  # fmt: skip
            os.kill(pid, signal.SIGTERM)
            return
        log.info("upgrade: pid %d serves now; this process (pid %d) stops accepting and drains",
                 pid, os.getpid())  # fmt: skip
        systemd.notify(f"MAINPID={pid}", "READY=1", f"STATUS=upgraded: pid {pid} took over")
        systemd.release_notify()
        self.step_down()


def balancer_upgrader(balancer: Balancer, book: SocketBook) -> Upgrader:
    """The upgrade of a single process: its listeners' and admin sockets; it then stops at once."""

    def sockets() -> list[tuple[str, int]]:
        return book.handover({name: listener.bound for name, listener in balancer.listeners.items()})

    def step_down() -> None:
        balancer.stop_admin()
        balancer.shutdown(delay=False)

    return Upgrader(sockets, step_down, lambda: balancer.draining)


def successor_argv() -> list[str]:
    """Our own command line, to run again: the interpreter and what it was told (a script, -m …)."""
    original = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return [sys.executable, *original[1:]]


async def start_successor(sockets: Sequence[tuple[str, int]], timeout: float = UPGRADE_TIMEOUT) -> int:
    """Start the new process on `sockets`; its pid once it reported ready, else UpgradeFailed."""
    read_end, write_end = os.pipe()
    try:
        pid = spawn_successor(successor_argv(), sockets, write_end)
    except OSError as exc:
        os.close(read_end)
        raise UpgradeFailed(f"starting {sys.executable}: {exc.strerror or exc}") from None
    finally:
        os.close(write_end)
    log.info("upgrade: new process %d started with %d sockets", pid, len(sockets))
    with trio.move_on_after(timeout):
        try:
            report = await read_report(read_end)
        finally:
            trio.lowlevel.notify_closing(read_end)
            os.close(read_end)
        if is_ready(report):
            return pid
        status = await wait_pid(pid)
        raise UpgradeFailed(f"the new process {pid} {describe_status(status)} before it served "
                            "(its own log lines say why)")  # fmt: skip
    await stop_failed(pid)
    raise UpgradeFailed(f"the new process {pid} did not serve within {timeout:g}s; it was stopped")


def spawn_successor(argv: Sequence[str], sockets: Sequence[tuple[str, int]], ready_fd: int) -> int:
    """posix_spawn the wrapped `argv` with `sockets` on descriptors 3… and `ready_fd` after them."""
    import fcntl  # Unix only, and only here

    count = len(sockets)
    floor = LISTEN_FDS_START + count + 1  # above every target, so no dup2 overwrites a source
    sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in [*(fd for _, fd in sockets), ready_fd]]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, LISTEN_FDS_START + i) for i, fd in enumerate(sources)]
        env = successor_environment(os.environ, [name for name, _ in sockets], systemd.notify_socket())
        return os.posix_spawn("/bin/sh", ["/bin/sh", "-c", WRAPPER, "anubis", *argv], env,
                              file_actions=actions)  # fmt: skip
    finally:
        for fd in sources:
            os.close(fd)


def successor_environment(env: Mapping[str, str], names: Sequence[str], notify: str | None) -> dict[str, str]:
    """Our environment, with the socket-activation variables for `names` (LISTEN_PID: the wrapper's)."""
    ours = (*systemd.LISTEN_VARIABLES, "NOTIFY_SOCKET", UPGRADE_FD_ENV)
    out = {key: value for key, value in env.items() if key not in ours}
    out["LISTEN_FDS"] = str(len(names))
    out["LISTEN_FDNAMES"] = ":".join("" if ":" in name else name for name in names)
    out[UPGRADE_FD_ENV] = str(LISTEN_FDS_START + len(names))
    if notify is not None:
        out["NOTIFY_SOCKET"] = notify
    return out


async def read_report(fd: int) -> bytes:
    """What the new process wrote on the pipe until READY, EOF (it exited) or MAX_REPORT bytes."""
    os.set_blocking(fd, False)
    data = b""
    while not is_ready(data) and len(data) < MAX_REPORT:
        try:
            chunk = os.read(fd, MAX_REPORT - len(data))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not chunk:
            break
        data += chunk
    return data


def is_ready(report: bytes) -> bool:
    """Whether the new process's report has the line READY=1."""
    return READY in report.splitlines()


async def wait_pid(pid: int) -> int:
    """Wait for child `pid` to exit (a pidfd where Linux has one, else polling); its exit status
    as subprocess reports it (negative: killed by that signal)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(pid)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        await trio.sleep(0.05)


async def stop_failed(pid: int) -> None:
    """SIGTERM a new process that failed to report; SIGKILL it after STOP_GRACE."""
    os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        await wait_pid(pid)
        return
    os.kill(pid, signal.SIGKILL)
    await wait_pid(pid)


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


# ------------------------------------------------------------- the new side


@final
class Predecessor:
    """The process that started us in an upgrade: told once we serve, instead of systemd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @staticmethod
    def claim() -> Predecessor | None:
        """Take ANUBIS_UPGRADE_FD out of the environment (close-on-exec from now on); None if unset."""
        text = os.environ.pop(UPGRADE_FD_ENV, None)
        if text is None:
            return None
        try:
            fd = int(text)
            if fd < LISTEN_FDS_START:
                raise ValueError(fd)
            os.set_inheritable(fd, False)
        except (ValueError, OSError):
            log.error("%s=%r names no descriptor of ours; ignored", UPGRADE_FD_ENV, text[:40])
            return None
        return Predecessor(fd)

    def ready(self) -> None:
        """Report READY=1 (a predecessor that gave up meanwhile is not an error of ours)."""
        try:
            os.write(self.fd, READY + b"\n")
        except OSError as exc:
            log.warning("upgrade: the old process is not listening any more (%s)", exc.strerror or exc)
        finally:
            os.close(self.fd)


def announce_ready(predecessor: Predecessor | None, status: str) -> None:
    """We serve: tell the process we replace (it hands systemd over), else systemd itself."""
    if predecessor is not None:
        predecessor.ready()
        return
    systemd.notify("READY=1", f"STATUS={status}")
