"""Least connections: the fewest open connections per unit of weight (HAProxy leastconn).

An O(n) scan. The scan starts one place further each pick, so servers with
equal load take turns instead of the first one in the list taking every tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic

from trioanubis.strategies.base import S, load


class LeastConnections(Generic[S]):
    def __init__(self) -> None:
        self._start = 0

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        count = len(servers)
        if not count:
            return None
        self._start = (self._start + 1) % count
        best: S | None = None
        best_load = 0.0
        for offset in range(count):
            server = servers[(self._start + offset) % count]
            server_load = load(server)
            if (best is None or server_load < best_load) and usable(server):
                best, best_load = server, server_load
        return best
