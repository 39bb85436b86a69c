"""How worker processes share the listeners' addresses.

Theory of operation: the supervisor binds every listener itself, before any
worker starts, so a port in use is reported once, by it, and a listener
asking for port 0 gets one concrete port that every worker then uses. What
happens next depends on the platform, decided at run time (never at import):

- Where SO_REUSEPORT balances connections across sockets (Linux), the
  supervisor's socket is bound but never listens: it only holds the address.
  Each worker binds its own listening socket to the same address with
  SO_REUSEPORT, and the kernel hashes every new connection (by its addresses
  and ports) to one of them: no thundering herd, no shared accept queue.
- Elsewhere the supervisor's socket listens, and every worker inherits it
  (`pass_fds`) and accepts from it: the workers share one accept queue.

`Holds` is the supervisor's set of those sockets, kept in step with reloads.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from typing import final

from trioanubis.config import Address, Config, ListenerConfig
from trioanubis.proxy.listener import open_listen_socket, somaxconn


def reuse_port_balances() -> bool:
    """True where SO_REUSEPORT spreads connections over the sockets that share a port."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


@final
class Holds:
    """The supervisor's sockets, one per listener, kept in step with reloads."""

    def __init__(self, reuse_port: bool) -> None:
        self.reuse_port = reuse_port
        # listener name → (bind as configured, socket, the concrete address it got)
        self.held: dict[str, tuple[Address, socket.socket, Address]] = {}

    async def prepare(self, listeners: Mapping[str, ListenerConfig]) -> Holding:
        """Bind the listeners that are new or moved; on an AnubisError nothing new stays bound."""
        new: Holding = {}
        try:
            for name, listener in listeners.items():
                old = self.held.get(name)
                if old is not None and old[0] == listener.bind:
                    continue
                backlog = listener.backlog or somaxconn()
                sock = await open_listen_socket(
                    listener.bind, backlog, reuse_port=self.reuse_port, listen=not self.reuse_port
                )
                host, port = sock.getsockname()[:2]
                new[name] = (listener.bind, sock, Address(host, port))
        except BaseException:
            for _, sock, _ in new.values():
                sock.close()
            raise
        return new

    def commit(self, new: Holding, config: Config) -> None:
        """Hold `new` (from `prepare`) and close what listeners of `config` no longer use."""
        for name in [n for n in self.held if n not in config.listeners or n in new]:
            self.held.pop(name)[1].close()
        self.held.update(new)

    def concrete_binds(self, config: Config, new: Holding | None = None) -> dict[str, str]:
        """Each listener's concrete address, as the workers must bind or find it."""
        held = {**self.held, **(new or {})}
        return {name: str(held[name][2]) for name in config.listeners}

    def inherited(self) -> dict[str, int]:
        """Without SO_REUSEPORT: concrete address → descriptor the workers inherit."""
        if self.reuse_port:
            return {}
        return {str(concrete): sock.fileno() for _, sock, concrete in self.held.values()}

    def close(self) -> None:
        for _, sock, _ in self.held.values():
            sock.close()
        self.held.clear()


Holding = dict[str, tuple[Address, socket.socket, Address]]


async def open_shared_socket(bind: Address, backlog: int, inherited: Mapping[str, int]) -> socket.socket:
    """A worker's listening socket for `bind` (a concrete address from the supervisor)."""
    fd = inherited.get(str(bind))
    if fd is None:
        return await open_listen_socket(bind, backlog, reuse_port=True)
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    return sock
