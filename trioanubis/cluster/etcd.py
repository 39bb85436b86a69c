"""The etcd v3 client: keys, transactions, leases and watches, under Trio.

Theory of operation: `EtcdClient` is a thin typed shell. Each method builds
its call (`calls.py`), has the `Session` deliver it (endpoints in order,
kept-alive connection, auth token, timeout: `session.py`), and parses the
answer back into a record (`answers.py`). `watch` hands back a `Watch` that owns
a connection of its own (`watch.py`). Whatever goes wrong is one `EtcdError`
subclass (`errors.py`); arguments out of range are `ValueError` at once.

Why etcd's JSON gateway over HTTP/1.1, with h11 (a dependency already):
- The `etcd3` package on PyPI is unmaintained: its last release (0.12.0)
  fails at import with protobuf 4+ (kragniz/python-etcd3 #1957, #2709, open
  since 2022). gRPC's Python runtime has no Trio support (it brings its own event
  loop or threads), so the gRPC API itself is out of reach without a thread
  per call or a hand-written HTTP/2 + protobuf stack.
- Every etcd since 3.4 serves the same API as JSON on its client port
  (grpc-gateway, `/v3/...`; 3.4 is what Debian ships), including watches as
  a streaming answer of one JSON object per line. That is a small, bounded,
  sans-IO parser plus h11 over Trio sockets, with TLS from `ssl`.
- What it costs: base64 keys and values in JSON (about 1.4x the bytes),
  int64s as strings, and one TCP connection per watch instead of gRPC's
  multiplexing. For a fleet of balancers sharing server lists, drains and
  weights, these are small; etcd documents the gateway as a supported API.

Usage:

    async with EtcdClient(["http://10.0.0.1:2379", "http://10.0.0.2:2379"]) as etcd:
        await etcd.put("/anubis/pools/web/servers/a", b"...")
        found = await etcd.get("/anubis/pools/", prefix=True)
        async with etcd.watch("/anubis/pools/", found.revision + 1) as changes:
            async for event in changes:
                ...   # EtcdCompacted: read again, watch from the new read's revision + 1

Limits: each attempt (connect, request, whole answer) within `timeout`; a
unary answer at most `max_response` bytes, a watch line at most
`max_watch_line`; JSON at most `reading.MAX_DEPTH` deep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, TypeVar, final

from trioanubis.cluster.answers import (
    Deleted,
    GetResult,
    Lease,
    TxnResult,
    parse_delete,
    parse_grant,
    parse_keep_alive,
    parse_range,
    parse_revision,
    parse_txn,
)
from trioanubis.cluster.calls import (
    Call,
    Compare,
    Op,
    Put,
    as_bytes,
    delete_call,
    grant_call,
    keep_alive_call,
    put_call,
    range_call,
    revoke_call,
    txn_call,
)
from trioanubis.cluster.errors import EtcdLeaseExpired
from trioanubis.cluster.http import Endpoint, parse_endpoint
from trioanubis.cluster.reading import INT64_MAX
from trioanubis.cluster.session import Limits, Session
from trioanubis.cluster.watch import Watch
from trioanubis.tls.context import client_context

# A request answered within this on a healthy cluster; a dead member costs this per call tried.
DEFAULT_TIMEOUT: Final = 5.0
MAX_TIMEOUT: Final = 3600.0
# The largest unary answer read: a range of 10,000 keys of 200-byte values is 3.8 MB. Parsing
# runs on the event loop, about 0.15 s for those (0.3 s for 48,000 tiny keys in 4 MiB, at most
# 0.2 s for hostile JSON), so a larger limit is a longer stall.
MAX_RESPONSE: Final = 4 * 1024 * 1024
# The largest watch line: one line carries every event of one revision (deleting a prefix
# of 10,000 keys is 1.3 MB).
MAX_WATCH_LINE: Final = 4 * 1024 * 1024
MIN_LIMIT: Final = 4096
# etcd's own bound on a lease's TTL (lease.MaxLeaseTTL).
MAX_LEASE_TTL: Final = 9_000_000_000

T = TypeVar("T")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"etcd {name} must be in [{low:g}, {high:g}], got {value!r}")


def _endpoints(texts: Sequence[str], tls: bool) -> tuple[Endpoint, ...]:
    if isinstance(texts, str) or not texts:
        raise ValueError("etcd endpoints must be a non-empty list of URLs")
    return tuple(parse_endpoint(text if "://" in text or not tls else f"https://{text}") for text in texts)


@final
class EtcdClient:
    """An etcd v3 client; close it (`async with`, or `aclose`) to close its kept connections.

    `endpoints` are `http(s)://host:port` (a bare `host:port` is https when a
    CA or client certificate is given). `ca` checks the servers' certificates
    (else the system's CAs); `cert` and `key` are a client certificate.
    `username` and `password` authenticate; the token is renewed as needed.
    """

    def __init__(self, endpoints: Sequence[str], *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, username: str | None = None, password: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_response: int = MAX_RESPONSE,
                 max_watch_line: int = MAX_WATCH_LINE) -> None:  # fmt: skip
        _in_range("timeout", timeout, 0.001, MAX_TIMEOUT)
        _in_range("max_response", max_response, MIN_LIMIT, 2**31)
        _in_range("max_watch_line", max_watch_line, MIN_LIMIT, 2**31)
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        parsed = _endpoints(endpoints, bool(ca or cert))
        context = None
        if any(endpoint.tls for endpoint in parsed):  # TlsConfigError names a file that does not load
            context = client_context(verify=True, ca=ca or "", cert=cert or "", key=key or "")
        credentials = (username, password) if username is not None and password is not None else None
        self._session = Session(parsed, context, credentials, Limits(timeout, max_response, max_watch_line))

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(str(endpoint) for endpoint in self._session.endpoints)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:  # fmt: skip
        await self.aclose()

    async def aclose(self) -> None:
        """Close the kept connections (watches own theirs and are closed by their owners)."""
        await self._session.aclose()

    async def _run(self, call: Call, parse: Callable[[bytes, str], T]) -> T:
        body, where = await self._session.call(call)
        return parse(body, f"{call.what} on {where}")

    async def get(self, key: str | bytes, *, prefix: bool = False, revision: int = 0) -> GetResult:
        """The key (or every key under the prefix), as of `revision` (0: the latest)."""
        _in_range("revision", revision, 0, INT64_MAX)
        return await self._run(range_call(key, prefix=prefix, revision=revision), parse_range)

    async def put(self, key: str | bytes, value: str | bytes, *, lease: int = 0) -> int:
        """Set the key (attached to `lease` if not 0); the revision of the change."""
        _in_range("lease", lease, 0, INT64_MAX)
        return await self._run(put_call(key, value, lease=lease), parse_revision)

    async def delete(self, key: str | bytes, *, prefix: bool = False) -> Deleted:
        """Delete the key (or every key under the prefix); how many went, and the revision."""
        return await self._run(delete_call(key, prefix=prefix), parse_delete)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:  # fmt: skip
        """Run `success` if every compare holds, else `failure`, atomically."""
        return await self._run(txn_call(compare, success, failure), parse_txn)

    async def compare_and_set(self, key: str | bytes, value: str | bytes, mod_revision: int, *,
                              lease: int = 0) -> bool:  # fmt: skip
        """Put the key only if its mod_revision is still `mod_revision` (0: only if it does not exist)."""
        _in_range("mod_revision", mod_revision, 0, INT64_MAX)
        result = await self.txn([Compare(key, mod_revision)], [Put(key, value, lease)])
        return result.succeeded

    async def grant_lease(self, ttl: int, *, lease_id: int = 0) -> Lease:
        """A new lease of `ttl` seconds (etcd picks the ID unless `lease_id` is given)."""
        _in_range("lease TTL", ttl, 1, MAX_LEASE_TTL)
        _in_range("lease ID", lease_id, 0, INT64_MAX)
        return await self._run(grant_call(ttl, lease_id), parse_grant)

    async def keep_lease_alive(self, lease_id: int) -> int:
        """Renew the lease once; its TTL. EtcdLeaseExpired if it is gone: grant a new one."""
        _in_range("lease ID", lease_id, 1, INT64_MAX)
        return await self._run(keep_alive_call(lease_id), parse_keep_alive)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys; a lease already gone is not an error (it is revoked)."""
        _in_range("lease ID", lease_id, 1, INT64_MAX)
        try:
            await self._run(revoke_call(lease_id), parse_revision)
        except EtcdLeaseExpired:
            return

    def watch(self, key: str | bytes, start_revision: int = 0, *, prefix: bool = True) -> Watch:
        """The changes under `key` (a prefix, unless `prefix=False`) from `start_revision` (0: from now)."""
        _in_range("start_revision", start_revision, 0, INT64_MAX)
        return Watch(self._session, as_bytes(key), prefix=prefix, start_revision=start_revision)
