"""Weighted random (HAProxy random(1)) and power of two choices (random(2), Envoy least_request).

Both draw from the cumulative weights with a binary search: O(log n) a draw,
the table rebuilt once per change of the server tuple. When the drawn server
is not usable (full, or already tried during failover), a few more draws are
made before an O(n) fallback over the usable ones.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Final, Generic

from trioanubis.strategies.base import S, load

# Draws before falling back to a scan of the usable servers: enough that a
# pool with one full server almost never scans, few enough to stay O(1).
REDRAWS: Final = 4


class WeightedRandom(Generic[S]):
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._servers: Sequence[S] | None = None
        self._cumulative: list[float] = []

    def draw(self, servers: Sequence[S]) -> S:
        if servers is not self._servers:
            self._servers = servers
            self._cumulative = list(itertools.accumulate(s.effective_weight for s in servers))
        point = self._random.random() * self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, point)
        return servers[min(index, len(servers) - 1)]

    def draw_usable(self, servers: Sequence[S], usable: Callable[[S], bool]) -> S | None:
        for _ in range(REDRAWS):
            server = self.draw(servers)
            if usable(server):
                return server
        rest = [s for s in servers if usable(s)]
        if not rest:
            return None
        return self._random.choices(rest, weights=[s.effective_weight for s in rest])[0]

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        if not servers:
            return None
        return self.draw_usable(servers, usable)


class PowerOfTwo(Generic[S]):
    """Two weighted-random candidates; the one with fewer connections per weight wins."""

    def __init__(self, seed: int | None = None) -> None:
        self._random: WeightedRandom[S] = WeightedRandom(seed)

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        if not servers:
            return None
        first = self._random.draw_usable(servers, usable)
        if first is None or len(servers) == 1:
            return first
        second = self._random.draw_usable(servers, usable)
        if second is not None and load(second) < load(first):
            return second
        return first
