"""systemd's two process protocols, without libsystemd: readiness notification and socket activation.

Theory of operation:

- **Notification** (sd_notify(3)). The service manager names a Unix datagram
  socket in `$NOTIFY_SOCKET` (a path, or an abstract name written with a
  leading '@'); each notification is one datagram of `KEY=VALUE` lines:
  `READY=1` once the listeners accept, `RELOADING=1` with `MONOTONIC_USEC=`
  when a reload starts and `READY=1` when it ended, `STOPPING=1` at shutdown,
  `STATUS=` for `systemctl status`, `MAINPID=` when an upgrade hands the
  service to a new process. `claim_environment` takes the variable out of the
  environment once, at start (as `sd_notify(unset_environment=1)` does), so no
  child (a worker, a replica) speaks for us by accident; `notify` then sends
  to the socket it claimed, and does nothing when there is none. Sending
  never blocks and never raises: a full or missing socket costs a logged
  warning, not the service.
- **Socket activation** (sd_listen_fds(3)). The manager passes listening
  sockets as descriptors 3, 4, … with `LISTEN_FDS` (how many), `LISTEN_PID`
  (for whom: a variable inherited by a child is not the child's) and
  optionally `LISTEN_FDNAMES` (colon-separated, `FileDescriptorName=` in the
  .socket unit). `claim_environment` reads them only when `LISTEN_PID` is our
  pid, unsets all three, and returns each descriptor as a socket, marked
  close-on-exec and non-blocking; a descriptor that is not a listening stream
  socket is logged and closed. `assign` (pure) decides which listener takes
  which socket: by name first, then the unnamed ones (no name, systemd's
  "unknown", or a unit's default name "NAME.socket") in order to the
  listeners nothing named; a named one nobody uses is returned as unused, for
  the caller to log and close. An upgrade (upgrade.py) hands sockets to the
  new process through the same variables, so one path adopts both.

Nothing here runs at import: the platform's Unix sockets are looked up when used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Final

log = logging.getLogger("trioanubis.systemd")

# The first descriptor the manager passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3
# More passed descriptors than this is a broken environment, not a config.
MAX_LISTEN_FDS: Final = 4096
# Names systemd gives a descriptor that no FileDescriptorName= named.
UNNAMED: Final = frozenset({"", "unknown"})
# The fd name of the admin endpoint's sockets (an upgrade passes them on; a .socket unit may too).
ADMIN_FD_NAME: Final = "anubis.admin"
LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class _Claimed:
    """The notify socket this process took from its environment (None: nobody listens)."""

    path: str | None = None
    warned = False


def claim_environment() -> list[tuple[str, socket.socket]]:
    """Take NOTIFY_SOCKET and the passed sockets out of the environment; the sockets, with their names."""
    _Claimed.path = os.environ.pop("NOTIFY_SOCKET", None) or None
    try:
        passed = parse_listen_environment(os.environ, os.getpid())
    except ValueError as exc:
        log.error("socket activation: %s; no socket taken from it", exc)
        passed = []
    finally:
        for name in LISTEN_VARIABLES:
            os.environ.pop(name, None)
    return [(name, sock) for fd, name in passed if (sock := _adopt(fd, name)) is not None]


def parse_listen_environment(env: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The (descriptor, name) pairs LISTEN_* pass to process `pid`; [] when they are not for it.

    ValueError names what is malformed. Names missing from LISTEN_FDNAMES count as unnamed.
    """
    if "LISTEN_FDS" not in env or env.get("LISTEN_PID", "").strip() != str(pid):
        return []
    text = env["LISTEN_FDS"].strip()
    if not text.isascii() or not text.isdigit() or int(text) > MAX_LISTEN_FDS:
        raise ValueError(f"LISTEN_FDS must be a count from 0 to {MAX_LISTEN_FDS}, got {text[:40]!r}")
    count = int(text)
    names = env["LISTEN_FDNAMES"].split(":") if "LISTEN_FDNAMES" in env else []
    if names and len(names) != count:
        log.warning("socket activation: LISTEN_FDNAMES has %d names for %d descriptors; the rest "
                    "count as unnamed", len(names), count)  # fmt: skip
    names = (names + [""] * count)[:count]
    return [(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def _adopt(fd: int, name: str) -> socket.socket | None:
    """Descriptor `fd` as a socket of ours, if it is a listening stream socket; else closed, None."""
    what = f"socket activation: descriptor {fd} ({name!r})"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        log.error("%s is not a socket (%s); closed", what, exc.strerror or exc)
        _close_fd(fd)
        return None
    listening = 1  # where the platform cannot say, trust the manager
    if hasattr(socket, "SO_ACCEPTCONN"):
        with contextlib.suppress(OSError):
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        log.error("%s is not a listening stream socket; closed", what)
        sock.close()
        return None
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def is_unnamed(name: str) -> bool:
    """A name systemd makes up when the unit names nothing: "", "unknown", or the unit's own name."""
    return name in UNNAMED or name.endswith(".socket")


def assign(listeners: Sequence[str], names: Sequence[str],
           reserved: Sequence[str] = ()) -> tuple[dict[str, list[int]], list[int]]:  # fmt: skip
    """Which passed sockets (by index into `names`) each listener takes, and the indices nobody takes.

    By name first (a name may repeat: one socket per worker); then the
    unnamed ones, one each and in order, to the listeners nothing named.
    `reserved` names (the admin endpoint's) match by name only.
    """
    taken: dict[str, list[int]] = {}
    unnamed: list[int] = []
    unused: list[int] = []
    wanted = set(listeners) | set(reserved)
    for index, name in enumerate(names):
        if name in wanted:
            taken.setdefault(name, []).append(index)
        elif is_unnamed(name):
            unnamed.append(index)
        else:
            unused.append(index)
    waiting = [name for name in listeners if name not in taken]
    for name, index in zip(waiting, unnamed, strict=False):
        taken[name] = [index]
    unused += unnamed[len(waiting):]
    return taken, sorted(unused)


# ------------------------------------------------------------------- notify


def notify_socket() -> str | None:
    """The notify socket this process claimed (an upgrade passes it to the new process)."""
    return _Claimed.path


def release_notify() -> None:
    """Stop notifying: after MAINPID= names the new process, ours would be refused (NotifyAccess=main)."""
    _Claimed.path = None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, what RELOADING=1 carries (time.monotonic is that clock on Linux)."""
    return time.monotonic_ns() // 1000


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=…") as one notification; False when nobody listens or it failed."""
    path = _Claimed.path
    if path is None:
        return False
    try:
        send_datagram(path, "\n".join(fields).encode("utf-8", errors="replace"))
    except (OSError, ValueError) as exc:  # (ValueError: should an address ever be refused as text)
        if not _Claimed.warned:
            _Claimed.warned = True
            log.warning("systemd: cannot notify %r: %s (logged once)", path, exc)
        return False
    return True


def send_datagram(path: str, message: bytes) -> None:
    """One datagram to the Unix socket `path` ('@name': abstract), without blocking; OSError if it fails."""
    if not path.startswith(("/", "@")):
        raise OSError(f"unsupported NOTIFY_SOCKET address {path!r}")
    address = "\0" + path[1:] if path.startswith("@") else path
    family = getattr(socket, "AF_UNIX", None)
    if family is None:
        raise OSError("this platform has no Unix sockets")
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.sendto(message, address)
