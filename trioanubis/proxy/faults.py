"""Injected network faults: which connection gets which fault, and how each direction misbehaves.

Theory of operation: a server's `faults` (pool.py keeps it resolved: the
server's own table, else its pool's, None when nothing is set) is read once
per connection, right after the connect; None, the rule, leaves the fast path
untouched. Otherwise `draw` decides with the table's `probability` whether
this connection is affected and returns a `FaultPlan`: what each direction
does (`DirectionPlan`). A faulted connection is then relayed by the
stream relay (streams.py), whatever its transport (plain or TLS), never by
splice nor the dispatcher's inline steps. `refuse` acts earlier, per connect
attempt (`refused`), so the failover and passive ejection of failover.py see
a refused connect exactly as if the server had refused it.

Everything here is pure (plain values in, plain values out) apart from the
random draws, which take a `random.Random` so tests can seed them. Faults set
at runtime change `server.faults`; a connection drew its plan when it
started, so it keeps it until it ends.

Counting: each fault that acts on a connection counts once in
`server.faults_applied` (latency, jitter, bandwidth, blackhole, slice when the
plan is drawn; reset_after and close_after when they cut; refuse per refused
attempt), shown in /metrics as `anubis_faults_applied_total`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

from trioanubis.config import FaultConfig
from trioanubis.errors import ConnectFailed

if TYPE_CHECKING:
    from trioanubis.pool import Server

# The draws need no cryptographic quality, only independence per connection: one generator per
# thread, so balancers embedded in two threads (trioanubis.testing) share none.
_local = threading.local()


def _rng() -> random.Random:
    rng: random.Random | None = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = random.Random()
    return rng


@final
@dataclass(frozen=True, slots=True)
class DirectionPlan:
    """What one direction of one connection suffers (all zero: relayed as is, by the copying path)."""

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: int = 0  # bytes per second; 0: unlimited
    reset_after: int = 0
    close_after: int = 0
    blackhole: bool = False
    slice: int = 0
    slice_delay: float = 0.0

    def delay(self, rng: random.Random | None = None) -> float:
        """How long the next chunk is held: latency, give or take up to jitter."""
        if not self.jitter:
            return self.latency
        return max(0.0, self.latency + (rng or _rng()).uniform(-self.jitter, self.jitter))

    @property
    def limit(self) -> int:
        """Bytes this direction delivers before its cut (0: no cut)."""
        return min((n for n in (self.reset_after, self.close_after) if n), default=0)

    @property
    def cut(self) -> str:
        """What the cut at `limit` is: "fault_reset" or "fault_close" (a reset wins a tie)."""
        if self.reset_after and (not self.close_after or self.reset_after <= self.close_after):
            return "fault_reset"
        return "fault_close"


CLEAN: Final = DirectionPlan()
# A server's own table that sets nothing: it wins over its pool's (the admin's DELETE).
NO_FAULTS: Final = FaultConfig()


@final
@dataclass(frozen=True, slots=True)
class FaultPlan:
    """One connection's faults, drawn once when it starts."""

    upstream: DirectionPlan  # client → server
    downstream: DirectionPlan  # server → client


# The faults counted when a plan is drawn (the cuts count when they happen).
_DRAWN: Final = ("latency", "jitter", "bandwidth", "blackhole", "slice")


def draw(faults: FaultConfig, server: Server, rng: random.Random | None = None) -> FaultPlan | None:
    """This connection's plan, or None when the dice spare it (or only `refuse` is set)."""
    if faults.probability < 1 and (rng or _rng()).random() >= faults.probability:
        return None
    plan = DirectionPlan(
        latency=faults.latency, jitter=faults.jitter, bandwidth=faults.bandwidth,
        reset_after=faults.reset_after, close_after=faults.close_after, blackhole=faults.blackhole,
        slice=faults.slice, slice_delay=faults.slice_delay,
    )  # fmt: skip
    if plan == CLEAN:
        return None
    for name in _DRAWN:
        if getattr(faults, name):
            count(server, name)
    upstream = plan if faults.direction in ("upstream", "both") else CLEAN
    downstream = plan if faults.direction in ("downstream", "both") else CLEAN
    return FaultPlan(upstream, downstream)


def refused(server: Server, rng: random.Random | None = None) -> ConnectFailed | None:
    """The error of a connect attempt that `refuse` fails, or None to connect for real."""
    faults = server.faults
    if faults is None or not faults.refuse:
        return None
    if faults.probability < 1 and (rng or _rng()).random() >= faults.probability:
        return None
    count(server, "refuse")
    return ConnectFailed(f"connecting to {server.address}: refused (injected fault)", "refused")


def count(server: Server, fault: str) -> None:
    server.faults_applied[fault] = server.faults_applied.get(fault, 0) + 1


def describe(faults: FaultConfig | None) -> dict[str, Any] | None:
    """The faults in effect as JSON (/stats, the admin's answer): the keys that are set."""
    if faults is None:
        return None
    shown: dict[str, Any] = {"direction": faults.direction, "probability": faults.probability}
    for name in ("latency", "jitter", "slice_delay"):
        if getattr(faults, name):
            shown[name] = f"{getattr(faults, name) * 1000:g}ms"
    for name in ("bandwidth", "reset_after", "close_after", "slice"):
        if getattr(faults, name):
            shown[name] = f"{getattr(faults, name)}B" + ("/s" if name == "bandwidth" else "")
    for name in ("blackhole", "refuse"):
        if getattr(faults, name):
            shown[name] = True
    return shown
