"""Smooth weighted round robin (nginx's algorithm), with O(1) picks.

nginx's smooth round robin adds every server's weight to its "current" value,
takes the server with the highest current and subtracts the total weight from
it. The sequence it produces repeats every W = sum(weights) picks, so we
compute one cycle when the set of servers or their weights change and then
walk it: a pick is an index increment. Weights 5, 1, 1 give a a b a c a a.

Building a cycle costs O(W × distinct weights) once per change (weights are
first divided by their greatest common divisor; equal weights give the
servers in order in O(n)). Effective weights below full (slow start) are scaled by 16 so a server
can receive a fraction of its configured share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, Generic

from mypy_extensions import mypyc_attr

from trioanubis.strategies.base import S

# Resolution for fractional effective weights (slow start): 1/16 of a weight.
FRACTION_SCALE: Final = 16


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Weights as the smallest integers with the same ratios (fractions kept to 1/16)."""
    if all(w == int(w) for w in weights):
        ints = [int(w) for w in weights]
    else:
        ints = [max(1, round(w * FRACTION_SCALE)) for w in weights]
    divisor = math.gcd(*ints)
    return [w // divisor for w in ints]


def smooth_cycle(weights: Sequence[int]) -> list[int]:
    """One full cycle of nginx's smooth weighted round robin, as indexes into `weights`.

    nginx compares every server at every step. Servers of equal weight are
    always picked in index order (the one picked least often has the highest
    current value, ties going to the lowest index), so each weight class can
    stand in for its members: a step compares one representative per distinct
    weight, O(W × distinct weights) for the cycle instead of O(W × n).
    """
    total = sum(weights)
    classes: dict[int, list[int]] = {}
    for index, weight in enumerate(weights):
        classes.setdefault(weight, []).append(index)
    groups = list(classes.items())
    if len(groups) == 1:
        return list(range(len(weights))) * groups[0][0]
    picked = [0] * len(groups)  # picks so far per class
    cycle = []
    for step in range(1, total + 1):
        best_group, best_value, best_index = 0, 0, 0
        for group, (weight, members) in enumerate(groups):
            count = picked[group]
            size = len(members)
            # current value of the class's next member: step × weight − total × its picks
            value = step * weight - total * (count // size)
            index = members[count % size]
            if group == 0 or value > best_value or (value == best_value and index < best_index):
                best_group, best_value, best_index = group, value, index
        picked[best_group] += 1
        cycle.append(best_index)
    return cycle


@mypyc_attr(allow_interpreted_subclasses=True)  # a custom strategy ("module:Class") may extend it
class RoundRobin(Generic[S]):
    def __init__(self) -> None:
        self._servers: Sequence[S] | None = None
        self._cycle: list[S] = []
        self._position = 0

    def pick(self, servers: Sequence[S], client_key: bytes, usable: Callable[[S], bool]) -> S | None:
        if servers is not self._servers:
            self._rebuild(servers)
        cycle = self._cycle
        size = len(cycle)
        for _ in range(size):
            server = cycle[self._position]
            self._position += 1
            if self._position == size:
                self._position = 0
            if usable(server):
                return server
        return None

    def _rebuild(self, servers: Sequence[S]) -> None:
        self._servers = servers
        weights = integer_weights([s.effective_weight for s in servers]) if servers else []
        self._cycle = [servers[i] for i in smooth_cycle(weights)] if servers else []
        self._position = self._position % len(self._cycle) if self._cycle else 0
