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

A key's order: the owner of its slot first, then the owners of the slots its
probe sequence visits (slot + k × `PROBE_STEP`, for `2n + 2` probes), then any
server not met yet, from a place the hash picks. When the owner cannot take the
connection (full, or tried already) the pick goes down this order, so a
client that fails over always lands on the same second choice.

With `balance_factor` (bounded.py) a server at its bound is passed over the same
way, so only the overflow of a loaded server moves, and always to the same
next server. A pick then reads every candidate's `active`: O(n) instead of
O(1), the price of knowing the average load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Generic

from trioanubis.strategies.base import S
from trioanubis.strategies.bounded import Bounds, check_balance_factor

# Smallest table: keeps per-server slot counts large enough for an even
# spread with few servers, and rebuilds cheap (a few ms).
MIN_TABLE_SIZE: Final = 5003
# Slots per server in large pools: each server's share is then within about
# 1/20 of fair, and a 1,000-server table builds in well under 100 ms.
SLOTS_PER_SERVER: Final = 20
# The stride of a key's probe sequence through the table: a prime, so it is
# coprime with every table size but itself (then 1 is used).
PROBE_STEP: Final = 7919


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
    def __init__(self, balance_factor: float = 0.0) -> None:
        check_balance_factor(balance_factor)
        self._factor = balance_factor
        self._key: tuple[tuple[str, float], ...] = ()
        self._servers: Sequence[S] = ()
        self._table: list[int] = []
        self._bounds: Bounds | None = None  # with a balance factor: its share of the tuple's work

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        if not servers:
            return None
        if servers is not self._servers:
            self._refresh(servers)
        h = hash64(client_key)
        bound = self._bounds.for_pick(servers) if self._bounds is not None else None
        owner = self._servers[self._table[h % len(self._table)]]
        if usable(owner) and (bound is None or bound.admits(owner)):
            return owner  # the common case: one hash, one lookup
        fallback: S | None = None
        for server in self.order(h):
            if usable(server):
                if bound is None or bound.admits(server):
                    return server
                if fallback is None:
                    fallback = server
        return fallback  # every usable server is at its bound: the first of them, not a refusal

    def order(self, h: int) -> Iterator[S]:
        """The servers in the order key hash `h` prefers them (see the module's docstring)."""
        servers, table = self._servers, self._table
        size, count = len(table), len(servers)
        step = PROBE_STEP % size or 1
        seen: set[int] = set()
        for attempt in range(2 * count + 2):
            index = table[(h + attempt * step) % size]
            if index not in seen:
                seen.add(index)
                yield servers[index]
                if len(seen) == count:
                    return
        start = h % count
        for offset in range(count):
            index = (start + offset) % count
            if index not in seen:
                yield servers[index]

    def _refresh(self, servers: Sequence[S]) -> None:
        """A new candidate tuple: rebuild the table only when names or configured weights changed."""
        key = tuple((s.name, float(getattr(s, "weight", s.effective_weight))) for s in servers)
        if key != self._key:
            self._rebuild(servers, key)
        self._servers = servers
        if self._factor:
            self._bounds = Bounds(self._factor, servers)

    def _rebuild(self, servers: Sequence[S], key: tuple[tuple[str, float], ...]) -> None:
        self._key = key
        self._servers = servers
        size = next_prime(max(MIN_TABLE_SIZE, SLOTS_PER_SERVER * len(servers)))
        self._table = maglev_table([k[0] for k in key], [max(k[1], 1e-9) for k in key], size)
