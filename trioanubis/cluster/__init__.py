"""Shared state for a fleet of balancers: an etcd v3 client that runs under Trio.

Theory of operation: the package is a self-contained library; nothing else in
trioanubis imports it yet. Its layers, lowest first:

- `errors.py`: the `EtcdError` classes, one per thing a caller can act on.
- `wire.py`: sans-IO. Each call as a path and a JSON body, each answer
  parsed and checked into records; bounds on depth, numbers, lines. What
  etcd 3.4's JSON gateway does, as measured, is written there.
- `http.py`: one HTTP/1.1 connection (h11 over a Trio TCP or TLS stream);
  the socket boundary where OSError, ssl and h11 errors become EtcdErrors.
- `session.py`: endpoints in order with failover, the kept-alive connection,
  the auth token and its renewal, the per-attempt timeout.
- `watch.py`: a watch as an async iterator, on a connection of its own.
- `etcd.py`: `EtcdClient`, the typed API over all of that.
"""

from __future__ import annotations

from trioanubis.cluster.errors import (
    EtcdAuthError,
    EtcdBadResponse,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseExpired,
    EtcdRequestFailed,
    EtcdTimeout,
    EtcdUnavailable,
    EtcdUnreachable,
)
from trioanubis.cluster.etcd import EtcdClient
from trioanubis.cluster.http import parse_endpoint
from trioanubis.cluster.watch import Watch
from trioanubis.cluster.wire import (
    Compare,
    Delete,
    Deleted,
    Event,
    EventKind,
    Get,
    GetResult,
    KeyValue,
    Lease,
    Put,
    TxnResult,
)

__all__ = [
    "Compare",
    "Delete",
    "Deleted",
    "EtcdAuthError",
    "EtcdBadResponse",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseExpired",
    "EtcdRequestFailed",
    "EtcdTimeout",
    "EtcdUnavailable",
    "EtcdUnreachable",
    "Event",
    "EventKind",
    "Get",
    "GetResult",
    "KeyValue",
    "Lease",
    "Put",
    "TxnResult",
    "Watch",
    "parse_endpoint",
]
