"""The narrow view of a running balancer that the operator's surface reads.

Theory of operation: admin.py, metrics.py and status.py answer questions
about a balancer (its pools, listeners, replicas, counters) and act on its
servers (drain, enable, weight, faults, add, remove: commands, control.py).
They see it only through `View`, a protocol of what they read, so they never
import app.py: `app.Balancer` is one view, and the worker supervisor's (a
Balancer with pools and no listeners) another. `AdminCounters` is the admin endpoint's own part of
/stats and /metrics, read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from trioanubis.control import Command
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.io import Readiness
    from trioanubis.proxy.lifecycle import Limits
    from trioanubis.proxy.listener import Listener
    from trioanubis.spawn import Spawner


class AdminCounters(Protocol):
    """The admin endpoint's counters (admin.py's `Admin` is one)."""

    @property
    def internal_errors(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def accept_overloads(self) -> int: ...
    @property
    def misdirected(self) -> int: ...
    @property
    def cross_origin(self) -> int: ...


class View(Protocol):
    """What the operator's surface reads of a balancer (app.py's `Balancer` is one)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def listeners(self) -> Mapping[str, Listener]: ...
    @property
    def spawners(self) -> Mapping[str, Spawner]: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def draining(self) -> bool: ...
    @property
    def endings(self) -> Mapping[str, int]: ...  # connections ended, by end state
    @property
    def admin(self) -> AdminCounters | None: ...
    @property
    def reloads(self) -> int: ...  # applied
    @property
    def reload_failures(self) -> int: ...  # rejected, or applied except for a listener that could not move
    @property
    def poller(self) -> Readiness: ...  # the readiness backend (its name is in anubis_build_info)
    def is_ready(self) -> bool: ...  # listening and not draining
    def has_upstream(self) -> bool: ...  # every pool has a server to send clients to
    async def command(self, command: Command) -> Server: ...  # an operator's change (control.py)
    def cluster_stats(self) -> dict[str, Any] | None: ...  # the fleet's link to etcd; None: no [cluster]
    def fleet_document(self) -> dict[str, Any] | None: ...  # GET /fleet (fleet/members.py)
