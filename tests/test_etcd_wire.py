"""The sans-IO half of the etcd client: calls built (calls.py), answers read (reading.py, answers.py).

The answers below are what etcd 3.4.23 sent (captured with curl); the fuzz
tests throw bytes, deep JSON, huge numbers, wrong types and bad base64 at
every parser and accept nothing but an EtcdError.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioanubis.cluster.answers import (
    EventKind,
    error_from,
    parse_delete,
    parse_grant,
    parse_keep_alive,
    parse_range,
    parse_revision,
    parse_token,
    parse_txn,
    parse_watch_line,
)
from trioanubis.cluster.calls import Compare, Delete, Get, Put, prefix_end, range_call, txn_call, watch_call
from trioanubis.cluster.errors import (
    EtcdAuthError,
    EtcdBadResponse,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseExpired,
    EtcdRequestFailed,
    EtcdUnavailable,
    TokenRefused,
)
from trioanubis.cluster.http import parse_endpoint
from trioanubis.cluster.reading import MAX_DEPTH, Lines, load_json, too_deep

HEADER = ('"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709",'
          '"revision":"%d","raft_term":"2"}')
RANGE = ('{' + HEADER % 2 + ',"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1",'
         '"value":"YmFy"}],"count":"1"}').encode()  # fmt: skip
WATCH_PUT = ('{"result":{' + HEADER % 2 + ',"events":[{"kv":{"key":"Zm9v","create_revision":"2",'
             '"mod_revision":"2","version":"1","value":"YmFy"}}]}}').encode()  # fmt: skip
WATCH_DELETE = ('{"result":{' + HEADER % 4 + ',"events":[{"type":"DELETE","kv":{"key":"Zm9v",'
                '"mod_revision":"4"}}]}}').encode()  # fmt: skip
WATCH_COMPACTED = b'{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}'
WATCH_DENIED = ('{"result":{' + HEADER % 9 + ',"watch_id":"-1","created":true,"canceled":true,'
                '"cancel_reason":"rpc error: code = PermissionDenied desc = etcdserver: permission denied"}}'
                ).encode()  # fmt: skip
WATCH_BAD_TOKEN = WATCH_DENIED.replace(b"PermissionDenied", b"Unauthenticated").replace(
    b"etcdserver: permission denied", b"etcdserver: invalid auth token")
STREAM_ERROR = (b'{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing",'
                b'"http_status":"Service Unavailable"}}')  # fmt: skip


def grpc_body(code: int, message: str) -> bytes:
    return json.dumps({"error": message, "message": message, "code": code}).encode()


# --------------------------------------------------------------------------- measured answers


def test_parses_what_etcd_34_answers() -> None:
    found = parse_range(RANGE, "get")
    assert found.revision == 2 and found.count == 1
    assert (found.kvs[0].key, found.kvs[0].value, found.kvs[0].mod_revision) == (b"foo", b"bar", 2)
    assert parse_range(b"{" + (HEADER % 2).encode() + b"}", "get").kvs == ()  # no "kvs", no "count"
    assert parse_revision(b"{" + (HEADER % 7).encode() + b"}", "put") == 7
    assert parse_delete(b"{" + (HEADER % 8).encode() + b',"deleted":"1"}', "delete").deleted == 1
    txn = parse_txn(b'{' + (HEADER % 7).encode() + b',"succeeded":true,"responses":[{"response_delete_range":'
                    b'{"header":{"revision":"7"},"deleted":"1"}},{"response_put":{"header":{"revision":"7"}}}]}',
                    "txn")  # fmt: skip
    assert txn.succeeded and txn.revision == 7 and txn.responses[1] == 7
    lease = parse_grant(b"{" + (HEADER % 5).encode() + b',"ID":"4111120442412768784","TTL":"5"}', "grant")
    assert (lease.id, lease.ttl) == (4111120442412768784, 5)
    assert parse_keep_alive(b'{"result":{' + (HEADER % 5).encode() + b',"ID":"1234","TTL":"5"}}\n', "ka") == 5
    with pytest.raises(EtcdLeaseExpired):  # an unknown lease: 200, and no TTL
        parse_keep_alive(b'{"result":{' + (HEADER % 5).encode() + b',"ID":"999"}}\n', "ka")
    assert parse_token(b"{" + (HEADER % 8).encode() + b',"token":"HJXtTGofBNOUCDaX.28"}', "auth") == (
        "HJXtTGofBNOUCDaX.28")


def test_parses_watch_lines() -> None:
    put = parse_watch_line(WATCH_PUT, "watch")
    assert put.revision == 2 and not put.created
    assert (put.events[0].kind, put.events[0].key, put.events[0].value) == (EventKind.PUT, b"foo", b"bar")
    deleted = parse_watch_line(WATCH_DELETE, "watch").events[0]
    assert (deleted.kind, deleted.value, deleted.mod_revision) == (EventKind.DELETE, b"", 4)
    created = parse_watch_line(b'{"result":{' + (HEADER % 1).encode() + b',"created":true}}', "watch")
    assert created.created and created.events == ()
    with pytest.raises(EtcdCompacted) as caught:
        parse_watch_line(WATCH_COMPACTED, "watch")
    assert caught.value.compact_revision == 4
    with pytest.raises(EtcdAuthError, match="permission denied") as denied:
        parse_watch_line(WATCH_DENIED, "watch")
    assert not isinstance(denied.value, TokenRefused)
    with pytest.raises(TokenRefused):
        parse_watch_line(WATCH_BAD_TOKEN, "watch")
    with pytest.raises(EtcdUnavailable, match="transport is closing"):
        parse_watch_line(STREAM_ERROR, "watch")
    with pytest.raises(EtcdRequestFailed, match="cancelled the watch"):
        parse_watch_line(b'{"result":{"canceled":true}}', "watch")


@pytest.mark.slow
@pytest.mark.parametrize(("status", "code", "message", "kind"), [
    (400, 11, "etcdserver: mvcc: required revision has been compacted", EtcdCompacted),
    (400, 11, "etcdserver: mvcc: required revision is a future revision", EtcdRequestFailed),
    (404, 5, "etcdserver: requested lease not found", EtcdLeaseExpired),
    (401, 16, "etcdserver: invalid auth token", TokenRefused),
    (400, 3, "etcdserver: revision of auth store is old", TokenRefused),
    (400, 3, "etcdserver: user name is empty", EtcdAuthError),
    (400, 3, "etcdserver: authentication failed, invalid user ID or password", EtcdAuthError),
    (403, 7, "etcdserver: permission denied", EtcdAuthError),
    (503, 14, "etcdserver: no leader", EtcdUnavailable),
    (400, 3, "etcdserver: too many operations in txn request", EtcdRequestFailed),
])  # fmt: skip
def test_errors_etcd_answers_become_the_class_that_says_what_to_do(
    status: int, code: int, message: str, kind: type[EtcdError]
) -> None:
    error = error_from(status, grpc_body(code, message), "get 'a' on http://e:2379")
    assert type(error) is kind
    assert str(error) == f"get 'a' on http://e:2379: {message.removeprefix('etcdserver: ')}"


def test_an_error_body_that_is_not_etcds_is_a_bad_response() -> None:
    error = error_from(404, b"Not Found\n", "txn")
    assert isinstance(error, EtcdBadResponse) and str(error) == "txn: http 404: Not Found"  # no line end
    assert isinstance(error_from(500, b"", "get"), EtcdBadResponse)
    assert isinstance(error_from(400, b'{"code":true,"message":"x"}', "get"), EtcdBadResponse)


# --------------------------------------------------------------------------- calls


def test_prefix_end_is_etcds() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


def body(call: Any) -> Any:
    return json.loads(call.body)


def test_calls_are_what_the_gateway_takes() -> None:
    get = range_call("/p/", prefix=True, revision=9)
    assert get.path == "/v3/kv/range" and get.retry_safe
    assert body(get) == {"key": base64.b64encode(b"/p/").decode(),
                         "range_end": base64.b64encode(b"/p0").decode(), "revision": "9"}  # fmt: skip
    assert body(range_call("", prefix=True))["key"] == "AA=="  # every key
    cas = txn_call([Compare("k", 0)], [Put("k", "v", 7)], [Get("k"), Delete("d", prefix=True)])
    assert cas.path == "/v3/kv/txn" and not cas.retry_safe
    assert body(cas)["compare"] == [{"result": "EQUAL", "target": "MOD", "key": "aw==", "mod_revision": "0"}]
    assert body(cas)["success"] == [{"request_put": {"key": "aw==", "value": "dg==", "lease": "7"}}]
    assert txn_call([Compare("k", 3, "<")], [Get("k")]).retry_safe
    watch = watch_call(b"/p/", prefix=True, start_revision=5)
    assert body(watch)["create_request"]["start_revision"] == "5"
    assert body(watch)["create_request"]["progress_notify"] is True


@pytest.mark.parametrize("text", ["ftp://a:1", "http://a:1/v3", "http://a:99999", "http://:1", "http://u:p@a:1"])
def test_bad_endpoints_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ValueError, match="etcd endpoint"):
        parse_endpoint(text)


def test_endpoints() -> None:
    assert str(parse_endpoint("10.0.0.1")) == "http://10.0.0.1:2379"
    assert str(parse_endpoint("https://[::1]:2380")) == "https://[::1]:2380"
    assert parse_endpoint("https://[::1]:2380").authority == "[::1]:2380"


# --------------------------------------------------------------------------- bounds


def reference_depth(document: Any) -> int:
    if isinstance(document, dict):
        return 1 + max((reference_depth(v) for v in document.values()), default=0)
    if isinstance(document, list):
        return 1 + max((reference_depth(v) for v in document), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4),
                                                                 inner, max_size=3),
    max_leaves=40,
)  # fmt: skip


@pytest.mark.slow
@given(json_values, st.integers(min_value=1, max_value=8))
def test_too_deep_measures_what_json_loads_would_nest(document: Any, limit: int) -> None:
    text = json.dumps(document).encode()
    assert too_deep(text, limit) == (reference_depth(document) > limit)


@pytest.mark.slow
def test_deep_json_is_refused_before_parsing() -> None:
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        deep = opener * 100_000 + b"1" + closer * 100_000
        with pytest.raises(EtcdBadResponse, match="nests deeper"):
            load_json(deep, "get")
    with pytest.raises(EtcdBadResponse):
        load_json(b"[" * 1_000_000, "get")  # unclosed
    just = b'{"a":' * (MAX_DEPTH - 1) + b"{}" + b"}" * (MAX_DEPTH - 1)
    assert isinstance(load_json(just, "get"), dict)
    assert not too_deep(b'{"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\""}', 2)  # brackets in a string


def test_huge_numbers_and_constants_are_refused() -> None:
    for text in (b'{"a":' + b"9" * 5000 + b"}", b'{"a":NaN}', b'{"a":-Infinity}'):
        with pytest.raises(EtcdBadResponse):
            load_json(text, "get")
    for revision in ('"99999999999999999999"', '"-1"', "1.5", "true", '"１２"', '" 12"', "[1]"):
        with pytest.raises(EtcdBadResponse, match="revision"):
            parse_revision(b'{"header":{"revision":' + revision.encode() + b"}}", "put")
    assert parse_revision(b'{"header":{"revision":12}}', "put") == 12  # a JSON integer is fine too


def test_bad_base64_and_wrong_types_are_refused() -> None:
    for kv in ('{"key":"!!"}', '{"key":"Zm9"}', '{"key":3}', '{"value":["YQ=="]}', '{"key":"é"}'):
        with pytest.raises(EtcdBadResponse):
            parse_range(b'{"kvs":[' + kv.encode() + b"]}", "get")
    for answer in (b'{"responses":{}}', b'{"responses":[1]}', b'{"responses":[{}]}', b'{"header":[]}', b"[]",
                   b'"x"', b'{"succeeded":"yes"}'):  # fmt: skip
        with pytest.raises(EtcdBadResponse):
            parse_txn(answer, "txn")
    with pytest.raises(EtcdBadResponse, match="unknown type"):
        parse_watch_line(b'{"result":{"events":[{"type":"EXPLODE"}]}}', "watch")


def test_lines_are_split_and_bounded() -> None:
    lines = Lines(10, "watch")
    lines.feed(b'{"a":1}\n\n  \n{"b"')
    assert lines.next_line() == b'{"a":1}'
    assert lines.next_line() is None
    lines.feed(b":2}\n")
    assert lines.next_line() == b'{"b":2}'
    lines.feed(b"0123456789")
    assert lines.next_line() is None  # at the limit, not over it
    lines.feed(b"X")
    with pytest.raises(EtcdBadResponse, match="exceeds 10 bytes"):
        lines.next_line()
    tail = Lines(100, "watch")
    tail.feed(b'{"a":1}\n{"error":{}}')
    assert tail.next_line() == b'{"a":1}' and tail.next_line() is None
    assert tail.rest() == b'{"error":{}}' and tail.rest() == b""


# --------------------------------------------------------------------------- fuzz

PARSERS = [parse_range, parse_revision, parse_delete, parse_txn, parse_grant, parse_keep_alive, parse_token,
           parse_watch_line]  # fmt: skip

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["Zm9v", "!!", "AA==", "-1", "9" * 30, "PUT", "DELETE"]))
names = st.sampled_from(["header", "revision", "kvs", "key", "value", "mod_revision", "count", "deleted",
                         "succeeded", "responses", "response_range", "response_put", "response_delete_range",
                         "ID", "TTL", "token", "result", "events", "type", "kv", "created", "canceled",
                         "compact_revision", "cancel_reason", "error", "code", "message", "grpc_code",
                         "lease", "create_revision", "version"])  # fmt: skip
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(names, inner, max_size=6), max_leaves=30)  # fmt: skip


def only_etcd_errors(parse: Any, data: bytes) -> None:
    with contextlib.suppress(EtcdError):
        parse(data, "fuzz")


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PARSERS), st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_etcd_errors(parse: Any, data: bytes) -> None:
    only_etcd_errors(parse, data)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(st.sampled_from(PARSERS), documents)
def test_arbitrary_json_of_etcds_shape_raises_only_etcd_errors(parse: Any, document: Any) -> None:
    only_etcd_errors(parse, json.dumps(document).encode())
    only_etcd_errors(parse, json.dumps({"result": document}).encode())
    only_etcd_errors(parse, json.dumps({"kvs": [document], "responses": [document]}).encode())


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200) | documents.map(
    lambda d: json.dumps(d).encode()))  # fmt: skip
def test_any_error_answer_becomes_an_etcd_error(status: int, data: bytes) -> None:
    assert isinstance(error_from(status, data, "fuzz"), EtcdError)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(min_value=1, max_value=64))
def test_lines_never_hold_more_than_their_limit(pieces: list[bytes], limit: int) -> None:
    lines = Lines(limit, "fuzz")
    try:
        for piece in pieces:
            lines.feed(piece)
            while (line := lines.next_line()) is not None:
                assert len(line) <= limit
    except EtcdBadResponse:
        return
    assert len(lines.rest()) <= limit
