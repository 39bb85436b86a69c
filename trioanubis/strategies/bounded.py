"""Consistent hashing with bounded loads: the cap a hash strategy puts on each server.

Theory of operation (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
Bounded Loads", 2017; HAProxy `hash-balance-factor`, Envoy `hash_balance_factor`):
with a balance factor c ≥ 1, a server may take a new connection only while its
open connections (`active`) are below its weighted share of c times the load
there will be once this connection is placed:

    bound(s) = ceil(c × (A + 1) × w(s) / W)

where A is the candidates' open connections together, w(s) a server's effective
weight and W the candidates' weights together. A client whose server is below its
bound keeps it; the others (the overflow) go to the next server along their own
hash order that is below its bound, so where they go is itself consistent.

HAProxy (`chash_server_is_eligible` in src/lb_chash.c) rounds the total c × (A + 1)
up once and deals it out by cumulative weight, so the slots add up to exactly
that; here each server's share is rounded up on its own, the formula above. That
is never less than HAProxy's slots and at most one more per server, and it does
not depend on the order of the servers.

Invariants: the bounds add up to at least c × (A + 1) > A, so at every pick at
least one candidate is below its bound. For an integer `active` and a real x,
`active < ceil(x)` exactly when `active < x`, so the test needs no rounding. It
is made in floats, and again in exact rationals when the two sides are within
a billionth of each other (a float weight or factor is a binary fraction, so
the rationals are exact): whether a server is at its bound never depends on
float rounding, and a pick costs a sum of `active` and a few multiplications.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Final, final

from trioanubis.strategies.base import ServerView

# The factor's range: 1.0 is the tightest (no server above the weighted average,
# rounded up); beyond 100 the bound would almost never act.
MIN_BALANCE_FACTOR: Final = 1.0
MAX_BALANCE_FACTOR: Final = 100.0


def check_balance_factor(factor: float) -> None:
    """ValueError unless `factor` is 0 (no bound) or within the range."""
    if factor != 0 and not MIN_BALANCE_FACTOR <= factor <= MAX_BALANCE_FACTOR:  # NaN fails too
        raise ValueError(f"must be 0 (no bound) or a number from {MIN_BALANCE_FACTOR:g} to "
                         f"{MAX_BALANCE_FACTOR:g}")  # fmt: skip


# Closer than this (relative), float rounding could decide: the exact rationals do.
NEAR: Final = 1e-9


@final
class Bounds:
    """What the bounds of one candidate tuple share: the factor, and W (computed once per tuple)."""

    __slots__ = ("exact_factor", "exact_weights", "factor", "weights")

    def __init__(self, factor: float, servers: Sequence[ServerView]) -> None:
        self.factor = factor
        self.exact_factor = Fraction(factor)
        self.exact_weights = sum((Fraction(s.effective_weight) for s in servers), Fraction(0))
        self.weights = float(self.exact_weights)

    def for_pick(self, servers: Sequence[ServerView]) -> LoadBound:
        """The bounds now: A is read here, once per pick (O(n))."""
        return LoadBound(self, sum(s.active for s in servers) + 1)


@final
class LoadBound:
    """The bound of every candidate for one pick."""

    __slots__ = ("_bounds", "_placed", "_scale")

    def __init__(self, bounds: Bounds, placed: int) -> None:
        self._bounds = bounds
        self._placed = placed  # A + 1
        self._scale = bounds.factor * placed / bounds.weights if bounds.weights else 0.0

    def admits(self, server: ServerView) -> bool:
        """Whether `server` is below its bound: it may take this connection."""
        share = self._scale * server.effective_weight
        gap = share - server.active
        if abs(gap) > NEAR * share:
            return gap > 0
        return server.active < self.exact_share(server)

    def exact_share(self, server: ServerView) -> Fraction:
        """c × (A + 1) × w / W, exactly."""
        bounds = self._bounds
        if not bounds.exact_weights:
            return Fraction(0)
        return bounds.exact_factor * self._placed * Fraction(server.effective_weight) / bounds.exact_weights

    def of(self, server: ServerView) -> int:
        """bound(server), as /stats or a test would show it."""
        return math.ceil(self.exact_share(server))
