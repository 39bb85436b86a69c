"""Least time: lowest ewma_time × (active + 1) / weight (nginx Plus least_time).

`ewma` is the server's moving average of time to first response byte (or of
connect time, per the pool's `least_time` key), recorded by the relay. Servers
with no sample yet are tried first so every server gets measured; among them,
and among equal scores, the scan rotates so ties share the load. O(n).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic

from trioanubis.strategies.base import S


def score(server: S) -> float:
    """Expected cost of sending one more connection to `server` (-1 when unmeasured)."""
    if server.ewma is None:
        return -1.0 / (server.active + 1)
    return server.ewma * (server.active + 1) / server.effective_weight


class LeastTime(Generic[S]):
    def __init__(self) -> None:
        self._start = 0

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        count = len(servers)
        if not count:
            return None
        self._start = (self._start + 1) % count
        best: S | None = None
        best_score = 0.0
        for offset in range(count):
            server = servers[(self._start + offset) % count]
            server_score = score(server)
            if (best is None or server_score < best_score) and usable(server):
                best, best_score = server, server_score
        return best
