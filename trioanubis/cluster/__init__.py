"""Shared state for a fleet of balancers: an etcd v3 client that runs under Trio.

Theory of operation: the package is a self-contained library, imported by the
fleet (`trioanubis/fleet/`), which decides what the keys mean (`EtcdClient` in
`etcd.py` is where to start reading).
Its layers, lowest first:

- `errors.py`: the `EtcdError` classes, one per thing a caller can act on.
- `reading.py`: sans-IO. Bounded reading of untrusted JSON (depth,
  numbers, types) and of a stream's lines.
- `calls.py`, `answers.py`: sans-IO. Each call as a path and a JSON body;
  each answer parsed into records, each error into an EtcdError. What etcd
  3.4's JSON gateway does, as measured, is written in `answers.py`.
- `http.py`: one HTTP/1.1 connection (h11 over a Trio TCP or TLS stream);
  the socket boundary where OSError, ssl and h11 errors become EtcdErrors.
- `session.py`: endpoints in order with failover, the kept-alive connection,
  the auth token and its renewal, the per-attempt timeout.
- `watch.py`: a watch as an async iterator, on a connection of its own.
- `etcd.py`: `EtcdClient`, the typed API over all of that.
"""

from __future__ import annotations

from trioanubis.cluster.answers import Deleted, Event, EventKind, GetResult, KeyValue, Lease, TxnResult
from trioanubis.cluster.calls import Compare, Delete, Get, Put
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
