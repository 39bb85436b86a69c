"""etcd's answers, sans-IO: bodies and watch lines parsed into records, errors into EtcdErrors.

Theory of operation: `etcd.py` and `watch.py` hand each 200 body or watch
line to the matching `parse_*` function, `session.py` every other answer to
`error_from`; the bytes are read through `reading.py`'s bounded JSON and
typed `Fields`. An
error etcd answered becomes the class of `errors.py` that says what to do
(`grpc_error`). etcd's own client tells its errors apart by their exact
description (rpctypes' `errStringToError`); so does `grpc_error`, for the
few that share a gRPC code with others.

What etcd 3.4 (Debian's 3.4.23) does, measured, and what it shaped here:
- Paths are `/v3/...` (3.4 also keeps `/v3beta`; 3.5 only has `/v3`;
  `/v3alpha` is gone). The transaction is `/v3/kv/txn`, the lease calls
  `/v3/lease/...`; an unknown path is a text/plain 404 "Not Found".
- int64 fields come as JSON strings ("revision":"7"); defaults are left out.
- HTTP/1.1 keep-alive works across unary, streaming and error answers; Go's
  server keeps an idle connection open indefinitely (no idle timeout set).
- The token goes bare in `Authorization` ("Bearer ..." is refused).
- A unary error is HTTP 4xx/5xx (400 for InvalidArgument and OutOfRange,
  401 Unauthenticated, 404 NotFound) with `{"error","message","code"}`, often
  chunked with a `Grpc-Trailer-Content-Type` trailer. A stream that fails
  after it began sends `{"error":{"grpc_code","http_code","message",...}}`,
  on a SIGTERM of etcd as its last chunk without a newline.
- A streaming call (watch, lease keep-alive) answers chunked, one JSON
  object per line, each wrapped in `{"result": ...}`; the head comes only
  with the first line (a watch's `created`). The keep-alive ends once the
  request body has; a watch goes on after it (etcd ignores the client's
  half-close), until either side closes.
- A watch from a compacted revision answers `created`, then a message with
  `canceled` and `compact_revision`, and leaves the stream open. A watch the
  token does not allow answers `created` and `canceled` at once, with a
  `cancel_reason` of Go's form "rpc error: code = X desc = Y".
- A keep-alive of an unknown lease answers 200 with no TTL (TTL 0); a put
  or revoke with one is a 404 "requested lease not found".
- Auth on and no token: 400 "user name is empty". A restart of the member
  keeps simple tokens (they are replayed from its log); a password change
  drops the user's tokens: 401 "invalid auth token".
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

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
from trioanubis.cluster.reading import INT64_MAX, Fields, load_json

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


# etcd's gateway (server/embed/serve.go) answers this, as plain text, to any /v3/ request made with a
# client certificate that has a CommonName while both --client-cert-auth and auth are on.
GATEWAY_REFUSES_CN: Final = b"CommonName of client sending a request against gateway will be ignored"


def error_from(status: int, body: bytes, what: str) -> EtcdError:
    """The error an HTTP answer other than 200 carries."""
    try:
        document: object = load_json(body, what)
    except EtcdBadResponse:
        document = None
    grpc = _grpc_status(document)
    if grpc is not None:
        return grpc_error(grpc[0], grpc[1], what)
    if status == 400 and body.startswith(GATEWAY_REFUSES_CN):
        return EtcdAuthError(f"{what}: etcd refuses a client certificate with a CommonName once its auth "
                             "is on (its HTTP gateway, which this client speaks, would ignore the name): "
                             "use a certificate whose subject has no CommonName, or none")  # fmt: skip
    return EtcdBadResponse(f"{what}: http {status}: {show(body.strip()) or 'no body'}")
