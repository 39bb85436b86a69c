"""etcd's v3 JSON gateway, sans-IO: each call as a path and a JSON body (`Call`).

Theory of operation: a `*_call` function turns plain arguments into the
request the gateway takes, and nothing here touches a socket. Keys and
values are bytes on the wire (base64 in JSON; a `str` is UTF-8), int64s are
sent as JSON strings, as the gateway itself writes them. A prefix becomes
the range [prefix, `prefix_end(prefix)`), etcd's own convention (an empty
prefix: every key). `Call.what` names the call in messages;
`Call.retry_safe` says whether running it twice changes nothing, which is
what lets `session.py` retry it on another endpoint after a broken
connection: reads, keep-alives, revokes, watches and txns that only read are;
puts, deletes, grants and txns that write are not. Paths are `/v3/...`,
which etcd 3.4 (Debian's) and every later etcd serve.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from trioanubis.cluster.errors import show


@dataclass(frozen=True, slots=True)
class Call:
    """One request: `what` names it in messages; `retry_safe` when running it twice changes nothing."""

    what: str
    path: str
    body: bytes
    retry_safe: bool


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn condition on a key's mod_revision (0: the key does not exist)."""

    key: str | bytes
    mod_revision: int
    op: Literal["==", "!=", "<", ">"] = "=="


@dataclass(frozen=True, slots=True)
class Get:
    key: str | bytes
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Put:
    key: str | bytes
    value: str | bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str | bytes
    prefix: bool = False


Op = Get | Put | Delete
COMPARE_RESULTS: Final = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


def as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def b64(data: str | bytes) -> str:
    return base64.b64encode(as_bytes(data)).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's GetPrefixRangeEnd)."""
    for index in range(len(prefix) - 1, -1, -1):
        if prefix[index] < 0xFF:
            return prefix[:index] + bytes([prefix[index] + 1])
    return b"\0"  # all 0xff, or empty: every key from `prefix` on


def key_range(key: str | bytes, prefix: bool) -> dict[str, str]:
    raw = as_bytes(key)
    if not prefix:
        return {"key": b64(raw)}
    return {"key": b64(raw or b"\0"), "range_end": b64(prefix_end(raw))}


def _call(what: str, path: str, body: dict[str, Any], *, retry_safe: bool = False) -> Call:
    return Call(what, path, json.dumps(body, separators=(",", ":")).encode(), retry_safe)


def _named(verb: str, key: str | bytes, prefix: bool = False) -> str:
    return f"{verb} {'prefix ' if prefix else ''}{show(as_bytes(key))!r}"


def range_call(key: str | bytes, *, prefix: bool = False, revision: int = 0) -> Call:
    body: dict[str, Any] = key_range(key, prefix)
    if revision:
        body["revision"] = str(revision)
    return _call(_named("get", key, prefix), "/v3/kv/range", body, retry_safe=True)


def put_call(key: str | bytes, value: str | bytes, *, lease: int = 0) -> Call:
    body = _put_body(Put(key, value, lease))
    return _call(_named("put", key), "/v3/kv/put", body)


def _put_body(op: Put) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(op.key), "value": b64(op.value)}
    if op.lease:
        body["lease"] = str(op.lease)
    return body


def delete_call(key: str | bytes, *, prefix: bool = False) -> Call:
    return _call(_named("delete", key, prefix), "/v3/kv/deleterange", key_range(key, prefix))


def txn_call(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> Call:
    body = {"compare": [_compare_body(c) for c in compare], "success": [_op_body(op) for op in success],
            "failure": [_op_body(op) for op in failure]}  # fmt: skip
    keys = ", ".join(show(as_bytes(c.key)) for c in compare[:3])
    return _call(f"txn on {keys or 'no key'}", "/v3/kv/txn", body, retry_safe=not _writes(success, failure))


def _writes(*branches: Sequence[Op]) -> bool:
    return any(isinstance(op, (Put, Delete)) for branch in branches for op in branch)


def _compare_body(compare: Compare) -> dict[str, Any]:
    return {"result": COMPARE_RESULTS[compare.op], "target": "MOD", "key": b64(compare.key),
            "mod_revision": str(compare.mod_revision)}  # fmt: skip


def _op_body(op: Op) -> dict[str, Any]:
    if isinstance(op, Get):
        return {"request_range": key_range(op.key, op.prefix)}
    if isinstance(op, Put):
        return {"request_put": _put_body(op)}
    return {"request_delete_range": key_range(op.key, op.prefix)}


def grant_call(ttl: int, lease_id: int = 0) -> Call:
    return _call(f"grant a lease of {ttl} s", "/v3/lease/grant", {"TTL": str(ttl), "ID": str(lease_id)})


def keep_alive_call(lease_id: int) -> Call:
    return _call(f"keep lease {lease_id:x} alive", "/v3/lease/keepalive", {"ID": str(lease_id)},
                 retry_safe=True)  # fmt: skip


def revoke_call(lease_id: int) -> Call:
    return _call(f"revoke lease {lease_id:x}", "/v3/lease/revoke", {"ID": str(lease_id)}, retry_safe=True)


def authenticate_call(username: str, password: str) -> Call:
    body = {"name": username, "password": password}
    return _call(f"authenticate as {show(username)!r}", "/v3/auth/authenticate", body, retry_safe=True)


def watch_call(key: str | bytes, *, prefix: bool, start_revision: int) -> Call:
    request: dict[str, Any] = dict(key_range(key, prefix), progress_notify=True)
    if start_revision:
        request["start_revision"] = str(start_revision)
    return _call(_named("watch", key, prefix), "/v3/watch", {"create_request": request}, retry_safe=True)
