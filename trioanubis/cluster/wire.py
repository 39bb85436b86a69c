"""etcd's v3 JSON gateway, sans-IO: each call as a path and a body, each answer as a record.

Theory of operation: the I/O modules (`session.py`, `watch.py`) send what a
`*_call` function builds and hand the body that comes back to the matching
`parse_*` function; nothing here touches a socket or awaits. Everything in an
answer is checked before it is believed, since the server may be broken or
hostile:

- A body's JSON nesting is measured before `json.loads` sees it
  (`too_deep`: strings removed, then innermost bracket pairs stripped
  `MAX_DEPTH` times, in C loops), so the parser never recurses deeply; numbers
  longer than an int64 are refused while parsing; NaN and Infinity too.
- Every field is read through one typed reader: an int64 written as a string
  of at most 19 digits or as a JSON integer, in its range; base64 that
  decodes strictly; booleans that are booleans. A missing field has its
  proto3 default, since the gateway leaves defaults out (a PUT event has no
  "type", a count of 0 no "count").
- Whatever is wrong becomes `EtcdBadResponse`, with the call and endpoint in
  the message (`what`); an error etcd answered becomes the class of
  `errors.py` that says what to do (`grpc_error`). etcd's own client tells
  its errors apart by their exact description (rpctypes' `errStringToError`);
  so does `grpc_error`, for the few that share a gRPC code with others.

What etcd 3.4 (Debian's 3.4.23) does, measured, and what it shaped here:
- Paths are `/v3/...` (3.4 also keeps `/v3beta`; 3.5 only has `/v3`). The
  transaction is `/v3/kv/txn`, the lease calls `/v3/lease/...`.
- int64 fields come as JSON strings ("revision":"7"); defaults are left out.
- A unary error is HTTP 4xx/5xx (400 for InvalidArgument and OutOfRange,
  401 Unauthenticated, 404 NotFound) with `{"error","message","code"}`, often
  chunked with a `Grpc-Trailer-Content-Type` trailer. A stream that fails
  after it began sends `{"error":{"grpc_code","http_code","message",...}}`,
  on a SIGTERM of etcd as its last chunk without a newline.
- A streaming call (watch, lease keep-alive) answers one JSON object per
  line, each wrapped in `{"result": ...}`. The keep-alive ends once the
  request body has; the connection stays usable for the next request.
- A watch from a compacted revision answers `created`, then a message with
  `canceled` and `compact_revision`, and leaves the stream open. A watch the
  token does not allow answers `created` and `canceled` at once, with a
  `cancel_reason` of Go's form "rpc error: code = X desc = Y".
- A keep-alive of an unknown lease answers 200 with no TTL (TTL 0).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, final

from trioanubis.cluster.errors import (
    EtcdAuthError,
    EtcdBadResponse,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseExpired,
    EtcdRequestFailed,
    EtcdUnavailable,
    TokenRefused,
    show,
)

# Deepest JSON accepted: a txn answer nests 6 levels, a watch line 5; room for nested txns.
MAX_DEPTH: Final = 32
# Strings holding brackets: etcd's base64 and numbers never do, its error texts rarely; this many
# is not etcd, and keeps the one regex step of `too_deep` (a per-match cost) small.
MAX_BRACKETED_STRINGS: Final = 1024
# An int64 has at most 19 digits (and a sign).
MAX_DIGITS: Final = 20
# Python's own bound on int() (3.10.7+): converting this many digits is quick.
DIGITS_BOUNDED: Final = 4300
INT64_MAX: Final = 2**63 - 1

# gRPC status codes etcd answers with (google.golang.org/grpc/codes).
CANCELLED: Final = 1
NOT_FOUND: Final = 5
PERMISSION_DENIED: Final = 7
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16
GRPC_CODES: Final = {"Canceled": 1, "Unknown": 2, "InvalidArgument": 3, "DeadlineExceeded": 4,
                     "NotFound": 5, "AlreadyExists": 6, "PermissionDenied": 7, "ResourceExhausted": 8,
                     "FailedPrecondition": 9, "Aborted": 10, "OutOfRange": 11, "Unimplemented": 12,
                     "Internal": 13, "Unavailable": 14, "DataLoss": 15, "Unauthenticated": 16}  # fmt: skip

# etcd's descriptions (api/v3rpc/rpctypes/error.go) of the errors whose gRPC code is shared.
COMPACTED: Final = "etcdserver: mvcc: required revision has been compacted"
LEASE_NOT_FOUND: Final = "etcdserver: requested lease not found"
AUTH_FAILED: Final = "etcdserver: authentication failed, invalid user ID or password"
USER_EMPTY: Final = "etcdserver: user name is empty"  # auth is on and the call carried no token
# The roles changed since the token was issued: etcd's own client authenticates again, as we do.
AUTH_OLD_REVISION: Final = "etcdserver: revision of auth store is old"
AUTH_MESSAGES: Final = frozenset({AUTH_FAILED, USER_EMPTY, "etcdserver: permission denied",
                                  "etcdserver: user name not found"})  # fmt: skip


class EventKind(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class GetResult:
    """The keys found (sorted by key) and the store's revision at the time of the read."""

    revision: int
    kvs: tuple[KeyValue, ...]
    count: int


@dataclass(frozen=True, slots=True)
class Deleted:
    revision: int
    deleted: int


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether the compares held; an answer per operation run: GetResult, Deleted, or a put's revision."""

    succeeded: bool
    revision: int
    responses: tuple[GetResult | Deleted | int, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch; a DELETE has an empty value."""

    kind: EventKind
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One line of a watch stream that did not end it: creation, events, or progress."""

    revision: int
    created: bool
    events: tuple[Event, ...]


# --------------------------------------------------------------------------- the calls


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


# --------------------------------------------------------------------------- reading JSON

_MARKS = bytes.maketrans(b"{}", b"[]")
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}')
_STRINGS = re.compile(rb'"[^"]*"')


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests deeper than `limit` (or its brackets do not pair up).

    Linear, and all but step 4 in bytes methods (C loops without a per-match
    cost, as a regex over every string would have: 0.7 s for 15 MB of
    small strings): (1) escaped backslashes and quotes go, so that every quote
    left delimits a string; (2) only quotes and brackets are kept; (3)
    adjacent quotes go: an empty string, or two strings with nothing between
    them, whose merger changes no bracket outside them; (4) the strings left
    hold brackets and go, unless there are more than `MAX_BRACKETED_STRINGS`
    (then the answer is refused); (5) innermost bracket pairs are stripped
    `limit` times. 16 MB of any content takes at most about 0.3 s.
    """
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = text.translate(_MARKS, _NOT_MARKS).replace(b'""', b"")
    if b'"' in marks:
        if marks.count(b'"') > 2 * MAX_BRACKETED_STRINGS:
            return True
        marks = _STRINGS.sub(b"", marks)
    for _ in range(limit):
        if not marks:
            return False
        inner = marks.replace(b"[]", b"")
        if len(inner) == len(marks):
            return True  # nothing pairs up: not JSON
        marks = inner
    return bool(marks)


def _bounded_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)


def _int_parser() -> Callable[[str], int] | None:
    """None (json's own, 3x faster) when the interpreter bounds int() itself (4300 digits by default)."""
    bound = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return None if 0 < bound <= DIGITS_BOUNDED else _bounded_int


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not a number etcd sends")


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `data`; EtcdBadResponse if it is not one, or too deep."""
    if too_deep(data):
        raise EtcdBadResponse(f"{what}: the answer nests deeper than {MAX_DEPTH} levels, or is not etcd JSON")
    try:
        document = json.loads(data, parse_int=_int_parser(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EtcdBadResponse(f"{what}: the answer is not JSON ({show(str(exc))}): {show(data)}") from None
    if not isinstance(document, dict):
        raise EtcdBadResponse(f"{what}: the answer is not a JSON object: {show(data)}")
    return document


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_INT64_TEXT = re.compile(r"-?[0-9]{1,19}")


@final
class Fields:
    """Typed reads of one JSON object of an answer; a wrong type or range is EtcdBadResponse."""

    __slots__ = ("_object", "what")

    def __init__(self, value: object, what: str, name: str = "answer") -> None:
        if not isinstance(value, dict):
            raise EtcdBadResponse(f"{what}: {name} is not an object: {show(repr(value))}")
        self._object: dict[str, Any] = value
        self.what = what

    def _bad(self, name: str, expected: str, raw: object) -> EtcdBadResponse:
        return EtcdBadResponse(f"{self.what}: {name} is not {expected}: {show(repr(raw))}")

    def number(self, name: str, low: int = 0, high: int = INT64_MAX) -> int:
        """An int64 field (JSON string or integer) within [low, high]; 0 when absent."""
        raw = self._object.get(name, 0)
        if type(raw) is str and _INT64_TEXT.fullmatch(raw):  # not int()'s "_", spaces or "+"
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise self._bad(name, f"an integer in [{low}, {high}]", raw)
        return raw

    def blob(self, name: str) -> bytes:
        """A bytes field (base64, decoded strictly); empty when absent."""
        raw = self._object.get(name, "")
        if not isinstance(raw, str) or not _BASE64.fullmatch(raw):
            raise self._bad(name, "base64 text", raw)
        try:
            return binascii.a2b_base64(raw)
        except binascii.Error:
            raise self._bad(name, "base64 text", raw) from None

    def text(self, name: str) -> str:
        raw = self._object.get(name, "")
        if not isinstance(raw, str):
            raise self._bad(name, "text", raw)
        return raw

    def flag(self, name: str) -> bool:
        raw = self._object.get(name, False)
        if not isinstance(raw, bool):
            raise self._bad(name, "true or false", raw)
        return raw

    def child(self, name: str) -> Fields:
        return Fields(self._object.get(name, {}), self.what, name)

    def children(self, name: str) -> list[Fields]:
        raw = self._object.get(name, [])
        if not isinstance(raw, list):
            raise self._bad(name, "a list", raw)
        return [Fields(item, self.what, name) for item in raw]

    def has(self, name: str) -> bool:
        return name in self._object


# --------------------------------------------------------------------------- the answers


def _revision(answer: Fields) -> int:
    return answer.child("header").number("revision")


def _key_value(kv: Fields) -> KeyValue:
    return KeyValue(kv.blob("key"), kv.blob("value"), kv.number("create_revision"), kv.number("mod_revision"),
                    kv.number("version"), kv.number("lease", -INT64_MAX))  # fmt: skip


def _range(answer: Fields) -> GetResult:
    kvs = tuple(_key_value(kv) for kv in answer.children("kvs"))
    return GetResult(_revision(answer), kvs, answer.number("count"))


def parse_range(body: bytes, what: str) -> GetResult:
    return _range(Fields(load_json(body, what), what))


def parse_revision(body: bytes, what: str) -> int:
    """The revision in the answer's header: for a put (or a revoke), the revision it made."""
    return _revision(Fields(load_json(body, what), what))


def parse_delete(body: bytes, what: str) -> Deleted:
    answer = Fields(load_json(body, what), what)
    return Deleted(_revision(answer), answer.number("deleted"))


def parse_txn(body: bytes, what: str) -> TxnResult:
    answer = Fields(load_json(body, what), what)
    responses = tuple(_txn_response(item, what) for item in answer.children("responses"))
    return TxnResult(answer.flag("succeeded"), _revision(answer), responses)


def _txn_response(item: Fields, what: str) -> GetResult | Deleted | int:
    if item.has("response_range"):
        return _range(item.child("response_range"))
    if item.has("response_put"):
        return _revision(item.child("response_put"))
    if item.has("response_delete_range"):
        deleted = item.child("response_delete_range")
        return Deleted(_revision(deleted), deleted.number("deleted"))
    raise EtcdBadResponse(f"{what}: a txn response of no known kind")


def parse_grant(body: bytes, what: str) -> Lease:
    answer = Fields(load_json(body, what), what)
    if answer.text("error"):
        raise EtcdRequestFailed(f"{what}: {show(answer.text('error'))}", 0)
    return Lease(answer.number("ID", 1), answer.number("TTL", 1))


def parse_keep_alive(body: bytes, what: str) -> int:
    """The lease's TTL after the keep-alive; EtcdLeaseExpired if etcd no longer has it."""
    line = body.split(b"\n", 1)[0]  # a stream of one answer; a second line would be an error
    document = load_json(line, what)
    if "error" in document:
        raise stream_error(document["error"], what)
    ttl = Fields(document, what).child("result").number("TTL", -INT64_MAX)
    if ttl <= 0:
        raise EtcdLeaseExpired(f"{what}: the lease has expired")
    return ttl


def parse_token(body: bytes, what: str) -> str:
    token = Fields(load_json(body, what), what).text("token")
    if not token or not token.isprintable() or not token.isascii():
        raise EtcdBadResponse(f"{what}: the token is not printable ASCII: {show(token)}")
    return token


# --------------------------------------------------------------------------- watch lines


def parse_watch_line(line: bytes, what: str) -> WatchMessage:
    """One line of a watch stream; the end of the watch (compaction, cancel, error) is raised."""
    document = load_json(line, what)
    if "error" in document:
        raise stream_error(document["error"], what)
    result = Fields(document, what).child("result")
    if result.flag("canceled"):
        raise _cancelled(result, what)
    events = tuple(_event(item) for item in result.children("events"))
    return WatchMessage(_revision(result), result.flag("created"), events)


def _event(item: Fields) -> Event:
    kind = item.text("type") or "PUT"
    if kind not in ("PUT", "DELETE"):
        raise EtcdBadResponse(f"{item.what}: an event of unknown type {show(kind)!r}")
    kv = _key_value(item.child("kv"))
    return Event(EventKind(kind), kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


_GO_STATUS = re.compile(r"rpc error: code = (\w+) desc = (.*)", re.DOTALL)


def _cancelled(result: Fields, what: str) -> EtcdError:
    compacted = result.number("compact_revision")
    if compacted:
        return EtcdCompacted(f"{what}: revisions before {compacted} are compacted", compacted)
    reason = result.text("cancel_reason")
    status = _GO_STATUS.fullmatch(reason)
    if status and status.group(1) in GRPC_CODES:
        return grpc_error(GRPC_CODES[status.group(1)], status.group(2), what)
    return EtcdRequestFailed(f"{what}: etcd cancelled the watch: {show(reason or 'no reason given')}",
                             CANCELLED)  # fmt: skip


# --------------------------------------------------------------------------- errors


def grpc_error(code: int, message: str, what: str) -> EtcdError:
    """The error etcd answered (gRPC `code`, `message`) as the class that says what to do."""
    text = f"{what}: {show(message.removeprefix('etcdserver: '))}"
    if message == COMPACTED:
        return EtcdCompacted(text)
    if code == UNAUTHENTICATED or message == AUTH_OLD_REVISION:
        return TokenRefused(text)
    if code == PERMISSION_DENIED or message in AUTH_MESSAGES:
        return EtcdAuthError(text)
    if code == NOT_FOUND and message == LEASE_NOT_FOUND:
        return EtcdLeaseExpired(text)
    if code == UNAVAILABLE:
        return EtcdUnavailable(text, code)
    return EtcdRequestFailed(text, code)


def _grpc_status(error: object) -> tuple[int, str] | None:
    """(code, message) of a gateway error object, unary or streaming shape; None if neither."""
    if not isinstance(error, dict):
        return None
    code = error.get("grpc_code", error.get("code"))
    message = error.get("message", error.get("error"))
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        return None
    return code, message


def stream_error(error: object, what: str) -> EtcdError:
    """The `{"error": {...}}` a gateway stream ends with, as an EtcdError."""
    status = _grpc_status(error)
    if status is None:
        return EtcdBadResponse(f"{what}: a stream error of unknown shape: {show(repr(error))}")
    return grpc_error(status[0], status[1], what)


def error_from(status: int, body: bytes, what: str) -> EtcdError:
    """The error an HTTP answer other than 200 carries."""
    try:
        document: object = load_json(body, what)
    except EtcdBadResponse:
        document = None
    grpc = _grpc_status(document)
    if grpc is None:
        return EtcdBadResponse(f"{what}: http {status}: {show(body) or 'no body'}")
    return grpc_error(grpc[0], grpc[1], what)


# --------------------------------------------------------------------------- lines of a stream


@final
class Lines:
    """Splits a stream into lines; a line longer than `limit` is EtcdBadResponse, so memory stays bounded."""

    def __init__(self, limit: int, what: str) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._limit = limit
        self._what = what

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next line that is not blank, without its newline; None until one is whole."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                self._check(self._scanned)
                return None
            self._check(end)
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.strip():
                return line

    def rest(self) -> bytes:
        """What is left after the last newline (a stream's last line may lack one)."""
        rest, self._buffer, self._scanned = bytes(self._buffer), bytearray(), 0
        return rest if rest.strip() else b""

    def _check(self, length: int) -> None:
        if length > self._limit:
            raise EtcdBadResponse(f"{self._what}: a line of the stream exceeds {self._limit} bytes")
