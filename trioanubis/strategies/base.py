"""The strategy interface: pure code that picks one server from the live view.

A strategy is any class with a no-argument constructor and a `pick` method
(a hash strategy may also take the pool's `balance_factor` as a keyword, see
`bounded.py`):

    def pick(self, servers, client_key, usable) -> server | None

- `servers` is a tuple of the servers that are available right now (up, not
  draining, weight > 0). The pool hands out the *same* tuple object until
  something changes, so a strategy may cache per-tuple work by identity
  (`servers is self._cached`) and keep picks O(1).
- `client_key` is the client's IP address as bytes (for hashing strategies).
- `usable(server)` says whether the server can take this connection now (it
  checks `max_connections` and the servers already tried during failover).
  Return a usable server, or None when no server is usable.

Servers expose plain attributes: `name`, `effective_weight` (float > 0),
`active` (open connections) and `ewma` (seconds, or None before the first
sample). A strategy must not change them. It runs on the event loop, so it
must not block, and it never does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class ServerView(Protocol):
    """What a strategy may read of a server."""

    @property
    def name(self) -> str: ...
    @property
    def effective_weight(self) -> float: ...
    @property
    def active(self) -> int: ...
    @property
    def ewma(self) -> float | None: ...


S = TypeVar("S", bound=ServerView)


class Strategy(Protocol):
    def pick(
        self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]
    ) -> S | None: ...


def load(server: ServerView) -> float:
    """Open connections per unit of weight: the quantity least-connection strategies minimise."""
    return server.active / server.effective_weight
