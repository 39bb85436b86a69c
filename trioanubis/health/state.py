"""Health state without I/O: rise/fall hysteresis and slow-start weights.

`Hysteresis.observe(up, ok)` takes the server's current state and one check
result and returns the new state: a down server needs `rise` passes in a row
to come up, an up one `fall` failures in a row to go down (HAProxy's rise and
fall). The very first check decides directly, so a fresh start neither waits
`rise` intervals for a live server nor sends traffic to a dead one.

`slow_start_weight` is the effective weight of a server that came up
`elapsed` seconds ago: it ramps linearly from 1/16 of its weight to all of
it over `duration`, in 16 steps so strategies rebuild their tables at most 16
times per ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

SLOW_START_STEPS: Final = 16


@dataclass(slots=True)
class Hysteresis:
    rise: int
    fall: int
    passes: int = 0
    failures: int = 0
    checked: bool = False

    def observe(self, up: bool, ok: bool) -> bool:
        """The server's state after one check result (`up` is its state before)."""
        if not self.checked:
            self.checked = True
            self.passes, self.failures = int(ok), int(not ok)
            return ok
        if ok:
            self.passes += 1
            self.failures = 0
            if not up and self.passes >= self.rise:
                self.passes = 0
                return True
        else:
            self.failures += 1
            self.passes = 0
            if up and self.failures >= self.fall:
                self.failures = 0
                return False
        return up


def slow_start_weight(weight: float, elapsed: float, duration: float) -> float:
    """Effective weight `elapsed` seconds after coming up, for a ramp of `duration`."""
    if duration <= 0 or elapsed >= duration:
        return weight
    step = max(1, math.floor(elapsed / duration * SLOW_START_STEPS))
    return weight * step / SLOW_START_STEPS


def next_slow_start_step(elapsed: float, duration: float) -> float:
    """Seconds after coming up at which the slow-start weight next changes."""
    step = math.floor(elapsed / duration * SLOW_START_STEPS) + 1
    return duration * step / SLOW_START_STEPS
