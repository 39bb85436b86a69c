"""How worker processes share the listeners' sockets, and how the supervisor keeps them to hand on.

Theory of operation: the supervisor opens every listener's sockets itself,
before any worker starts, so a port in use is reported once, by it, and a
listener asking for port 0 gets one concrete port that every worker then
uses. Workers inherit the sockets at their start (`pass_fds`) and find theirs
by the concrete address (`open_shared_socket`). A listener's sockets are
`Held` in one of three ways, decided at run time (never at import):

- **per worker** (where SO_REUSEPORT spreads connections over the sockets
  that share a port: Linux). One listening SO_REUSEPORT socket per worker
  slot, as nginx's `reuseport`: worker K accepts from socket K only, and the
  kernel hashes every new connection (by its addresses and ports) to one of
  them: no thundering herd, no shared accept queue. The supervisor holds all
  of them, so they outlive any one worker process: an upgrade (upgrade.py)
  hands every one to the new supervisor, whose worker K accepts from the
  same socket K while the old worker K drains, and no queued connection is
  lost. When a worker exits on its own its socket is closed (connections
  queued there are reset, as if the worker had owned it; new ones hash to
  the others while it is down) and a fresh one is bound just before the
  worker starts again (`release`, `renew`).
- **shared**: one listening socket whose accept queue every worker shares
  (elsewhere; and a socket systemd passed without SO_REUSEPORT, which no
  sibling can join).
- **placeholder** (a listener a reload added, under SO_REUSEPORT): running
  workers cannot inherit a socket opened after their start, so the
  supervisor only holds the address (bound, not listening) and each worker
  binds its own SO_REUSEPORT socket, as before the per-worker sockets. Such a
  listener is not handed over in an upgrade (its sockets belong to the
  workers); from the next start it is per worker.

Sockets passed in (systemd socket activation, an upgrade) are adopted by
listener name (ops/systemd.py `assign`): several sockets with SO_REUSEPORT
become the per-worker set (topped up, or the surplus closed, when the worker
count changed), anything else is shared.

`Holds` is the supervisor's set, kept in step with reloads.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, final

from trioanubis.config import Address, Config, ListenerConfig
from trioanubis.errors import AnubisError
from trioanubis.ops.systemd import assign
from trioanubis.proxy.listener import open_listen_socket, somaxconn
from trioanubis.upgrade import close_unused

log = logging.getLogger("trioanubis.supervisor")

Mode = Literal["per_worker", "shared", "placeholder"]
PER_WORKER: Final = "per_worker"
SHARED: Final = "shared"
PLACEHOLDER: Final = "placeholder"


def reuse_port_balances() -> bool:
    """True where SO_REUSEPORT spreads connections over the sockets that share a port."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


@final
@dataclass(slots=True)
class Held:
    """One listener's sockets in the supervisor."""

    bind: Address  # as configured
    address: Address  # the concrete address every worker uses
    mode: Mode
    sockets: list[socket.socket | None]  # per worker: slot K's is [K - 1] (None while it is down)
    backlog: int

    def fd_for(self, worker_id: int) -> int | None:
        """The descriptor worker `worker_id` accepts from; None: it binds its own."""
        if self.mode == PLACEHOLDER:
            return None
        sock = self.sockets[worker_id - 1 if self.mode == PER_WORKER else 0]
        return None if sock is None else sock.fileno()

    def close(self) -> None:
        for sock in self.sockets:
            if sock is not None:
                sock.close()


Holding = dict[str, Held]


@final
class Holds:
    """The supervisor's sockets, per listener, kept in step with reloads and worker restarts."""

    def __init__(self, reuse_port: bool, count: int = 1,
                 inherited: Sequence[tuple[str, socket.socket]] = ()) -> None:  # fmt: skip
        self.reuse_port = reuse_port
        self.count = count
        self.held: Holding = {}
        self.started = False  # the first commit happened: what prepare opens now is a reload's
        self._inherited = list(inherited)

    async def prepare(self, listeners: Mapping[str, ListenerConfig]) -> Holding:
        """Open the listeners that are new or moved; on an AnubisError nothing new stays open."""
        adopted = self._take_inherited(listeners)
        new: Holding = {}
        try:
            for name, listener in listeners.items():
                old = self.held.get(name)
                if old is not None and old.bind == listener.bind:
                    continue
                socks = adopted.pop(name, None)
                new[name] = await (self._adopt(name, listener, socks) if socks else self._open(listener))
        except BaseException:
            for held in new.values():
                held.close()
            raise
        finally:
            for socks in adopted.values():
                close_unused(socks, "its listener is not opened")
        return new

    def _take_inherited(self, listeners: Mapping[str, ListenerConfig]) -> dict[str, list[socket.socket]]:
        """The passed sockets by listener (once; the ones no listener takes are closed)."""
        inherited, self._inherited = self._inherited, []
        if not inherited:
            return {}
        taken, unused = assign(list(listeners), [name for name, _ in inherited])
        close_unused([inherited[i][1] for i in unused], "no listener of the config has its name")
        return {name: [inherited[i][1] for i in indices] for name, indices in taken.items()}

    async def _open(self, listener: ListenerConfig) -> Held:
        backlog = listener.backlog or somaxconn()
        if not self.reuse_port:
            sock = await open_listen_socket(listener.bind, backlog)
            return Held(listener.bind, _address_of(sock), SHARED, [sock], backlog)
        if self.started:  # running workers could not inherit a new socket: they bind their own
            sock = await open_listen_socket(listener.bind, backlog, reuse_port=True, listen=False)
            return Held(listener.bind, _address_of(sock), PLACEHOLDER, [sock], backlog)
        first = await open_listen_socket(listener.bind, backlog, reuse_port=True)
        held = Held(listener.bind, _address_of(first), PER_WORKER, [first], backlog)
        try:
            await self._top_up(held)
        except BaseException:
            held.close()
            raise
        return held

    async def _adopt(self, name: str, listener: ListenerConfig, socks: list[socket.socket]) -> Held:
        backlog = listener.backlog or somaxconn()
        address = _address_of(socks[0])
        if self.reuse_port and self.count > 1 and all(_reuses_port(s) for s in socks):
            close_unused(socks[self.count:], f"listener {name}: {self.count} workers use {self.count}")
            held = Held(listener.bind, address, PER_WORKER, list(socks[: self.count]), backlog)
            await self._top_up(held)
        else:
            close_unused(socks[1:], f"listener {name}: its workers share one socket")
            held = Held(listener.bind, address, SHARED, [socks[0]], backlog)
        log.info("listener %s: %d inherited socket%s on %s (%s)", name, min(len(socks), len(held.sockets)),
                 "" if len(socks) == 1 else "s", address, held.mode.replace("_", " "))  # fmt: skip
        return held

    async def _top_up(self, held: Held) -> None:
        """Bind per-worker sockets until every slot has one."""
        while len(held.sockets) < self.count:
            held.sockets.append(await open_listen_socket(held.address, held.backlog, reuse_port=True))

    def commit(self, new: Holding, config: Config) -> None:
        """Hold `new` (from `prepare`) and close what listeners of `config` no longer use."""
        for name in [n for n in self.held if n not in config.listeners or n in new]:
            self.held.pop(name).close()
        self.held.update(new)
        self.started = True

    def concrete_binds(self, config: Config, new: Holding | None = None) -> dict[str, str]:
        """Each listener's concrete address, as the workers must bind or find it."""
        held = {**self.held, **(new or {})}
        return {name: str(held[name].address) for name in config.listeners}

    def inherited(self, worker_id: int) -> dict[str, int]:
        """Concrete address → the descriptor worker `worker_id` inherits and accepts from."""
        out = {}
        for held in self.held.values():
            fd = held.fd_for(worker_id)
            if fd is not None:
                out[str(held.address)] = fd
        return out

    def release(self, worker_id: int) -> None:
        """Worker `worker_id` exited on its own: close its per-worker sockets (see the module doc)."""
        for held in self.held.values():
            sock = held.sockets[worker_id - 1] if held.mode == PER_WORKER else None
            if sock is not None:
                sock.close()
                held.sockets[worker_id - 1] = None

    async def renew(self, worker_id: int) -> None:
        """Before worker `worker_id` starts again: a fresh socket wherever `release` closed its one."""
        for name, held in self.held.items():
            if held.mode != PER_WORKER or held.sockets[worker_id - 1] is not None:
                continue
            try:
                sock = await open_listen_socket(held.address, held.backlog, reuse_port=True)
            except AnubisError as exc:  # it binds its own then, as a placeholder's workers do
                log.warning("listener %s: no socket for worker %d: %s", name, worker_id, exc)
                continue
            held.sockets[worker_id - 1] = sock

    def handover(self) -> list[tuple[str, int]]:
        """(listener name, descriptor) of every socket an upgrade passes on; placeholders are not."""
        out = []
        for name, held in self.held.items():
            if held.mode == PLACEHOLDER:
                log.warning("upgrade: listener %s (added by a reload) is not handed over: the new workers "
                            "bind their own sockets beside the old ones", name)  # fmt: skip
                continue
            out += [(name, sock.fileno()) for sock in held.sockets if sock is not None]
        return out

    def close(self) -> None:
        for held in self.held.values():
            held.close()
        self.held.clear()


def _address_of(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


def _reuses_port(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except (OSError, AttributeError):
        return False


async def open_shared_socket(bind: Address, backlog: int, inherited: Mapping[str, int]) -> socket.socket:
    """A worker's listening socket for `bind` (a concrete address from the supervisor)."""
    fd = inherited.get(str(bind))
    if fd is None:
        return await open_listen_socket(bind, backlog, reuse_port=True)
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    return sock
