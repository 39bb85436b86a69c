"""Source hash: consistent hashing of the client address with a Maglev table.

Maglev (Eisenbud et al., NSDI 2016; Envoy's `maglev`) gives each server a
pseudo-random permutation of the table slots and lets the servers take turns
claiming their next free slot, in proportion to their weight, until the table
is full. A lookup is one hash and one index: O(1). Adding or removing one of
N servers moves close to the minimal 1/N of the keys, and the spread between
servers stays within a few percent of fair.

The table depends only on the servers' names and configured weights, so slow
start or another server's drain does not reshuffle clients; it is rebuilt in
O(M log M) when membership changes, with M the larger of 5003 and 20 × servers
(a prime).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final, Generic

from trioanubis.strategies.base import S

# Smallest table: keeps per-server slot counts large enough for an even
# spread with few servers, and rebuilds cheap (a few ms).
MIN_TABLE_SIZE: Final = 5003
# Slots per server in large pools: each server's share is then within about
# 1/20 of fair, and a 1,000-server table builds in well under 100 ms.
SLOTS_PER_SERVER: Final = 20


def hash64(data: bytes, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "big")


def next_prime(n: int) -> int:
    def is_prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not is_prime(n):
        n += 1
    return n


def maglev_table(names: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """The Maglev lookup table: for each slot, the index of the server owning it."""
    count = len(names)
    offsets = [hash64(n.encode(), b"offset") % size for n in names]
    skips = [hash64(n.encode(), b"skip") % (size - 1) + 1 for n in names]
    heaviest = max(weights)
    shares = [w / heaviest for w in weights]
    credit = [0.0] * count
    next_index = [0] * count
    table = [-1] * size
    filled = 0
    while filled < size:
        for i in range(count):
            credit[i] += shares[i]
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
            slot = (offsets[i] + next_index[i] * skips[i]) % size
            while table[slot] >= 0:
                next_index[i] += 1
                slot = (offsets[i] + next_index[i] * skips[i]) % size
            table[slot] = i
            next_index[i] += 1
            filled += 1
            if filled == size:
                break
    return table


class SourceHash(Generic[S]):
    def __init__(self) -> None:
        self._key: tuple[tuple[str, float], ...] = ()
        self._servers: Sequence[S] = ()
        self._table: list[int] = []

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        if not servers:
            return None
        if servers is not self._servers:
            key = tuple((s.name, float(getattr(s, "weight", s.effective_weight))) for s in servers)
            if key != self._key:
                self._rebuild(servers, key)
            self._servers = servers
        h = hash64(client_key)
        size = len(self._table)
        # Probe further slots only when the owner cannot take this connection.
        for attempt in range(size):
            server = self._servers[self._table[(h + attempt * 7919) % size]]
            if usable(server):
                return server
            if attempt > 2 * len(servers):
                break
        rest = [s for s in servers if usable(s)]
        return rest[h % len(rest)] if rest else None

    def _rebuild(self, servers: Sequence[S], key: tuple[tuple[str, float], ...]) -> None:
        self._key = key
        self._servers = servers
        size = next_prime(max(MIN_TABLE_SIZE, SLOTS_PER_SERVER * len(servers)))
        self._table = maglev_table([k[0] for k in key], [max(k[1], 1e-9) for k in key], size)
