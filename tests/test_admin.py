"""The admin endpoint, over real HTTP."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import string
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    EVENTUALLY,
    connect,
    descriptors_exhausted,
    echo_handler,
    free_port,
    name_handler,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import (
    FUZZ_TOKEN,
    LiveBalancer,
    admin_config,
    anubis,
    blocking_exchange,
    http,
    wait_port,
)
from trioanubis.config import Address, parse_config
from trioanubis.errors import ConfigError
from trioanubis.ops.admin import MAX_ADMIN_CONNECTIONS, authorised, route


async def test_stats_json_shape(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    async with running_balancer(admin_config([{"address": backend.address, "name": "a"}])) as (b, address):
        assert await request(address) == b"a"
        await wait_until(lambda: b.pools["test"].servers[0].total == 1 and b.limits.active == 0)
        status, headers, body = await http(b.admin_address, "GET", "/stats")  # type: ignore[arg-type]
    assert status == 200 and headers["content-type"] == "application/json"
    document = json.loads(body)
    assert document["listeners"][0]["name"] == "test"
    assert document["listeners"][0]["accepted"] == 1
    server = document["pools"][0]["servers"][0]
    assert document["pools"][0]["strategy"] == "round_robin"
    keys = ("name", "state", "weight", "active", "total", "bytes_in", "bytes_out")
    assert {k: server[k] for k in keys} == {
        "name": "a", "state": "up", "weight": 1, "active": 0, "total": 1, "bytes_in": 4, "bytes_out": 1,
    }  # fmt: skip
    assert set(server) >= {"address", "effective_weight", "connect_failures", "last_check", "ewma_ms"}


async def test_metrics_parse_as_prometheus(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    async with running_balancer(admin_config([backend.address], health={"check": "tcp"})) as (b, address):
        await request(address)
        await wait_until(lambda: b.limits.active == 0)
        status, headers, body = await http(b.admin_address, "GET", "/metrics")  # type: ignore[arg-type]
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["anubis_server_up"].samples[0].value == 1
    assert families["anubis_server_up"].samples[0].labels == {"pool": "test", "server": backend.address}
    assert families["anubis_server_connections"].samples[0].value == 1
    assert families["anubis_listener_connections"].samples[0].labels == {"listener": "test"}
    histogram = families["anubis_connection_duration_seconds"]
    assert histogram.type == "histogram"
    count = [s for s in histogram.samples if s.name.endswith("_count")]
    assert count[0].value == 1
    checks = {s.labels["result"]: s.value for s in families["anubis_health_checks"].samples}
    assert checks["pass"] >= 1 and checks["fail"] == 0


async def test_token_is_enforced(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    async with running_balancer(admin_config([backend.address], token="s3cret")) as (b, _):
        admin = b.admin_address
        assert admin is not None
        status, headers, _ = await http(admin, "GET", "/stats")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert (await http(admin, "GET", "/stats", headers=(("Authorization", "Bearer wrong"),)))[0] == 401
        assert (await http(admin, "GET", "/stats", headers=(("Authorization", "Bearer s3cret"),)))[0] == 200


async def test_healthz_and_readyz(nursery: trio.Nursery) -> None:
    """Issue 29: /readyz was 503 whenever no server was up, taking every client pod of a sidecar
    out of its Service for the upstream's bad minute. Now /readyz is about the balancer itself;
    /readyz?upstream=1 asks about the servers too."""
    port = free_port()
    data = admin_config([f"127.0.0.1:{port}"], health={"check": "tcp", "interval": "50ms", "rise": 1})
    async with running_balancer(data) as (b, address):
        admin = b.admin_address
        assert admin is not None
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        await wait_until(lambda: not b.pools["test"].servers[0].healthy)
        assert (await http(admin, "GET", "/readyz"))[0] == 200  # its only server is down: still ready
        for asks_upstream in ("/readyz?upstream=1", "/readyz?upstream", "/readyz?verbose&upstream=1"):
            assert (await http(admin, "GET", asks_upstream))[0] == 503
        assert (await http(admin, "GET", "/readyz?upstream=0"))[0] == 200
        assert (await http(admin, "HEAD", "/readyz?upstream=1"))[0] == 503
        for bad in ("/readyz?upstream=yes", "/readyz?upstream=1&upstream=0"):
            status, _, body = await http(admin, "GET", bad)
            assert status == 400 and b"upstream takes 1" in body
        await start_backend(nursery, name_handler("x"), port=port)
        await wait_until(lambda: b.pools["test"].servers[0].healthy)
        assert (await http(admin, "GET", "/readyz"))[0] == 200
        assert (await http(admin, "GET", "/readyz?upstream=1"))[0] == 200
        held = await connect(address)  # keeps the drain going while we ask
        await wait_until(lambda: b.limits.active == 1)
        b.shutdown()  # draining: not ready any more, either way
        assert (await http(admin, "GET", "/readyz"))[0] == 503
        assert (await http(admin, "GET", "/readyz?upstream=1"))[0] == 503
        await held.aclose()


async def test_drain_stops_new_connections_but_open_ones_flow(nursery: trio.Nursery) -> None:
    first = await start_backend(nursery, echo_handler, "first")
    second = await start_backend(nursery, name_handler("second"))
    data = admin_config([{"address": first.address, "name": "first"}, second.address])
    async with running_balancer(data) as (b, address):
        admin = b.admin_address
        assert admin is not None
        held = await connect(address)  # round robin: goes to "first"
        await held.send_all(b"before")
        assert await held.receive_some(6) == b"before"
        status, _, body = await http(admin, "POST", "/pools/test/servers/first/drain")
        assert status == 200 and json.loads(body)["state"] == "draining"
        answers = [await request(address) for _ in range(4)]
        assert answers == [b"second"] * 4
        await held.send_all(b"after")  # the open connection is untouched
        assert await held.receive_some(5) == b"after"
        await held.aclose()
        assert (await http(admin, "POST", f"/pools/test/servers/{first.address}/enable"))[0] == 200
        assert b.pools["test"].servers[0].state == "up"


async def test_weight_change_changes_the_distribution(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    data = admin_config([{"address": one.address, "name": "one"}, {"address": two.address, "name": "two"}])
    async with running_balancer(data) as (b, address):
        admin = b.admin_address
        assert admin is not None
        status, _, body = await http(admin, "POST", "/pools/test/servers/one/weight", b'{"weight": 3}')
        assert status == 200 and json.loads(body)["weight"] == 3
        counts = Counter([await request(address) for _ in range(8)])
        assert counts == {b"one": 6, b"two": 2}


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/pools/nope/servers/x/drain", b"", 404),
        ("POST", "/pools/test/servers/nope/drain", b"", 404),
        ("POST", "/pools/test/servers/one/weight", b"not json", 400),
        ("POST", "/pools/test/servers/one/weight", b'{"weight": -1}', 400),
        ("POST", "/pools/test/servers/one/explode", b"", 404),
        ("GET", "/pools/test/servers/one/drain", b"", 405),
        ("POST", "/stats", b"", 405),
        ("GET", "/nothing", b"", 404),
    ],
)
async def test_bad_requests_get_json_errors(
    nursery: trio.Nursery, method: str, path: str, body: bytes, status: int
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([{"address": one.address, "name": "one"}])) as (b, _):
        got, headers, payload = await http(b.admin_address, method, path, body)  # type: ignore[arg-type]
    assert got == status
    assert headers["content-type"] == "application/json" and "error" in json.loads(payload)


async def test_garbage_oversized_and_slow_clients_never_disturb_the_proxy(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trioanubis.ops.admin.REQUEST_TIMEOUT", 0.2)
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address])) as (b, address):
        admin = b.admin_address
        assert admin is not None
        for junk in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"):
            stream = await connect(admin)
            async with stream:
                try:
                    await stream.send_all(junk)
                    answer = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    answer = b""
            assert answer == b"" or answer.split(b" ")[1].startswith(b"4")
        slow = await connect(admin)
        await slow.send_all(b"GET /stats HTTP/1.1\r\n")  # and never the rest
        with trio.fail_after(20):
            assert await slow.receive_some(1) == b""  # cut after REQUEST_TIMEOUT
        await slow.aclose()
        assert await request(address) == b"one"
        assert (await http(admin, "GET", "/healthz"))[0] == 200


def test_route_is_sans_io() -> None:
    class Nothing:
        def __init__(self) -> None:
            self.pools: dict[str, Any] = {}

    reply = route(Nothing(), "GET", "/healthz", [], b"", "")  # type: ignore[arg-type]
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert route(Nothing(), "GET", "/healthz", [], b"", "t").status == 200  # type: ignore[arg-type]
    refused = route(Nothing(), "GET", "/pools/x/servers/y/drain", [], b"", "t")  # type: ignore[arg-type]
    assert (refused.status, refused.close) == (401, True)


# ------------------------------------------------- hardening (issue 12)


async def raw_exchange(address: Address, data: bytes) -> bytes:
    """Send raw bytes and read until the admin closes (or 64 KiB); b"" when it resets us."""
    stream = await connect(address)
    answer = b""
    async with stream:
        try:
            await stream.send_all(data)
            with trio.fail_after(20):
                while len(answer) < 65536 and (chunk := await stream.receive_some(65536)):
                    answer += chunk
        except trio.BrokenResourceError:
            pass
    return answer


async def test_deeply_nested_json_is_refused_and_the_process_keeps_serving(nursery: trio.Nursery) -> None:
    """Finding 12.1: 20,000 nested "[" made json.loads raise RecursionError into the root nursery."""
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([{"address": one.address, "name": "one"}])) as (b, address):
        admin = b.admin_address
        assert admin is not None
        status, _, body = await http(admin, "POST", "/pools/test/servers/one/weight", b"[" * 20000)
        assert status == 413 and "too large" in json.loads(body)["error"]
        status, _, body = await http(admin, "POST", "/pools/test/servers/one/weight", b"[" * 3000)
        assert status == 400 and "nests" in json.loads(body)["error"]
        deep = b'{"weight": [[[[[[1]]]]]]}'
        assert (await http(admin, "POST", "/pools/test/servers/one/weight", deep))[0] == 400
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        assert await request(address) == b"one"
        assert b.pools["test"].servers[0].weight == 1


async def test_a_bug_in_a_handler_answers_500_is_logged_once_and_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("trioanubis").propagate = True

    def broken(balancer: object) -> object:
        raise RecursionError("a bug")

    monkeypatch.setattr("trioanubis.ops.admin.stats", broken)
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address])) as (b, address):
        admin = b.admin_address
        assert admin is not None
        for _ in range(3):
            status, headers, body = await http(admin, "GET", "/stats")
            assert status == 500 and json.loads(body) == {"error": "internal error"}
            assert headers["connection"] == "close"
        status, _, metrics = await http(admin, "GET", "/metrics")
        assert status == 200 and b"\nanubis_admin_internal_errors_total 3\n" in metrics
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        assert await request(address) == b"one"
    logged = [r for r in caplog.records if r.name == "trioanubis.admin" and "internal error" in r.message]
    assert len(logged) == 1 and logged[0].exc_info is not None


async def test_replies_carry_a_reason_phrase(nursery: trio.Nursery) -> None:
    """Issue 21.10: "HTTP/1.1 200 " became "HTTP/1.1 200 OK"."""
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address], token="s3cret")) as (b, _):
        admin = b.admin_address
        assert admin is not None
        for target, line in (("/healthz", b"HTTP/1.1 200 OK\r\n"),
                             ("/stats", b"HTTP/1.1 401 Unauthorized\r\n")):  # fmt: skip
            head = f"GET {target} HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
            answer = await raw_exchange(admin, head.encode())
            assert answer.startswith(line), answer[:40]
        answer = await raw_exchange(admin, b"GET /x HTTP/1.1\r\nHost: [::1]\r\nAuthorization: Bearer s3cret"
                                           b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")


async def test_probes_need_no_token_and_a_401_closes_its_connection(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address], token="s3cret")) as (b, _):
        admin = b.admin_address
        assert admin is not None
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        assert (await http(admin, "GET", "/readyz?verbose"))[0] == 200
        assert (await http(admin, "GET", "/metrics"))[0] == 401
        # Keep-alive asked for, but after the 401 the admin closes: the second request is never read.
        answer = await raw_exchange(admin, b"GET /stats HTTP/1.1\r\nHost: [::1]\r\n\r\n"
                                           b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n")  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 401 ") and answer.count(b"HTTP/1.1") == 1
        assert b"connection: close" in answer.lower()


async def test_idle_and_slow_callers_cannot_lock_out_the_admin(nursery: trio.Nursery) -> None:
    """Finding 12.3: 64 keep-alive connections without a token held every admin slot."""
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address], token="s3cret")) as (b, address):
        admin = b.admin_address
        assert admin is not None
        held: list[trio.SocketStream] = []
        for _ in range(MAX_ADMIN_CONNECTIONS):  # keep-alive, no token: idle after one answer
            stream = await connect(admin)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n")
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 ")  # 200 now; 401 once
            held.append(stream)
        for _ in range(16):  # slow: a request head that never ends
            stream = await connect(admin)
            await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: [::1]\r\n")
            held.append(stream)
        token = (("Authorization", "Bearer s3cret"),)
        status, _, body = await http(admin, "GET", "/stats", headers=token)
        assert status == 200 and json.loads(body)["admin"]["evicted"] >= 16
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        assert (await http(admin, "POST", "/pools/test/servers/0/drain", headers=token))[0] == 404
        assert await request(address) == b"one"
        for stream in held:
            await stream.aclose()


@pytest.mark.slow
async def test_keep_alive_connections_end_when_idle_and_at_their_lifetime(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trioanubis.ops.admin.KEEPALIVE_TIMEOUT", 0.2)
    monkeypatch.setattr("trioanubis.ops.admin.CONNECTION_LIFETIME", 1.0)
    one = await start_backend(nursery, name_handler("one"))
    async with running_balancer(admin_config([one.address])) as (b, _):
        admin = b.admin_address
        assert admin is not None
        stream = await connect(admin)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        with trio.fail_after(20):
            assert await stream.receive_some(1) == b""  # idle past KEEPALIVE_TIMEOUT: closed
        await stream.aclose()
        monkeypatch.setattr("trioanubis.ops.admin.KEEPALIVE_TIMEOUT", 10.0)
        stream = await connect(admin)
        answers = [b""]
        with trio.fail_after(20):  # a connection kept busy still ends once its lifetime is over
            while answers[-1] != b"CLOSED" and b"connection: close" not in answers[-1].lower():
                try:
                    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                    answers.append(await stream.receive_some(65536) or b"CLOSED")
                except trio.BrokenResourceError:  # it ended while we were between two requests
                    answers.append(b"CLOSED")
                await trio.sleep(0.01)
            if answers[-1] != b"CLOSED":
                assert await stream.receive_some(1) == b""
        await stream.aclose()
        answers = answers[1:-1] if answers[-1] == b"CLOSED" else answers[1:]
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)


# ------------------------------------- fuzzing a running balancer's admin


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


@pytest.mark.slow
def test_a_refused_body_is_taken_and_the_connection_ends_cleanly(live_balancer: LiveBalancer) -> None:
    """A 413 is answered before the body is read; the client may still send it: no reset may follow.

    Without a lingering close the admin closed with the body unread or still
    coming, the kernel answered the rest with a reset, and a client still
    sending lost the answer (seen in the fuzz test under load).
    """
    body = b"[" * 6000
    head = (f"PUT /pools/web/servers/one/faults HTTP/1.1\r\nHost: [::1]\r\n"
            f"Authorization: Bearer {FUZZ_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", live_balancer.admin), timeout=EVENTUALLY) as sock:
        sock.sendall(head)
        answer = sock.recv(65536)  # the answer comes before the body is sent
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        sock.sendall(body)  # what a client had on its way
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):  # a reset raises ConnectionResetError here
            rest += chunk
    assert live_balancer.process.poll() is None


def test_a_head_over_16_kib_is_refused_even_when_it_arrives_whole(live_balancer: LiveBalancer) -> None:
    """h11 bounds only a head still incomplete; 18 KB of short headers used to be answered 200."""
    headers = "".join(f"X-{i}: y\r\n" for i in range(3000))  # about 21 KB
    head = f"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n{headers}\r\n".encode()
    assert blocking_exchange(live_balancer.admin, head).startswith(b"HTTP/1.1 431 ")
    small = b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\n" + b"X: y\r\n" * 1000 + b"\r\n"  # 6 KB: fine
    assert blocking_exchange(live_balancer.admin, small).startswith(b"HTTP/1.1 200 ")


def test_two_authorization_headers_are_not_authorised(live_balancer: LiveBalancer) -> None:
    both = (f"GET /stats HTTP/1.1\r\nHost: [::1]\r\nAuthorization: Bearer wrong\r\n"
            f"Authorization: Bearer {FUZZ_TOKEN}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    assert blocking_exchange(live_balancer.admin, both).startswith(b"HTTP/1.1 401 ")
    one = (f"GET /stats HTTP/1.1\r\nHost: [::1]\r\nAuthorization: Bearer {FUZZ_TOKEN}\r\n"
           "Connection: close\r\n\r\n")  # fmt: skip
    assert blocking_exchange(live_balancer.admin, one.encode()).startswith(b"HTTP/1.1 200 ")


def http_bytes(
    method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, length: int | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(errors="surrogateescape"), b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


segments = st.sampled_from(["pools", "web", "servers", "one", "drain", "enable", "weight", "stats",
                            "metrics", "healthz", "readyz", "..", "%2e%2e", "%00", "%ff", "?", ""]) | st.text(
    alphabet=string.ascii_letters + string.digits + "%-._~!$&'()*+,;=:@?", max_size=8
) | st.text(max_size=4)  # fmt: skip
paths = st.lists(segments, max_size=6).map(lambda parts: "/" + "/".join(parts)) | st.builds(
    "/pools/{}/servers/{}/{}".format,
    st.sampled_from(["web", "nope"]) | segments,
    st.sampled_from(["one", "127.0.0.1:1"]) | segments,
    st.sampled_from(["weight", "drain", "enable"]) | segments,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps({"weight": v}).encode()),
    st.integers(1, 30000).map(lambda n: b"[" * n),
    st.integers(1, 5000).map(lambda n: b'{"weight": ' * n),
    st.integers(1, 3000).map(lambda n: b'{"a": "\\"' + b"[" * n + b'"}'),
)
header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
auths = st.sampled_from([b"", f"Bearer {FUZZ_TOKEN}".encode(), b"Bearer wrong", b"Basic Zm9vOmJhcg==",
                         f"Bearer {FUZZ_TOKEN}x".encode(), b"bearer " + FUZZ_TOKEN.encode()])  # fmt: skip


@st.composite
def admin_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # a tenth: raw garbage
        return draw(st.binary(min_size=1, max_size=2000))
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
                  | st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=8))  # fmt: skip
    values = st.text(alphabet=string.printable.strip(), max_size=40).map(str.encode) | st.binary(max_size=40)
    headers = draw(st.lists(st.tuples(header_names, values), max_size=4))
    auth = draw(st.sampled_from([f"Bearer {FUZZ_TOKEN}".encode()]) | auths)
    if auth:
        headers.append((b"Authorization", auth))
    body = draw(bodies)
    length = draw(st.sampled_from([len(body), len(body), None]) | st.integers(0, 1 << 40))
    return http_bytes(method, draw(paths), headers, body, length)


AUTHORISED = [(b"Authorization", f"Bearer {FUZZ_TOKEN}".encode())]
ADDED = b'{"address": "127.0.0.1:7", "name": "x"}'  # a server added at runtime (nothing listens there)
CLOSE = b"Host: [::1]\r\nConnection: close\r\n\r\n"


@pytest.mark.slow
@given(data=admin_requests())
@example(data=http_bytes("POST", "/pools/web/servers/one/weight", AUTHORISED, b"[" * 20000, 20000))
@example(data=http_bytes("POST", "/pools/web/servers/one/weight", AUTHORISED, b"[" * 4000, 4000))
@example(data=http_bytes("DELETE", "/pools/web/servers/one", AUTHORISED, b"", 0))
@example(data=http_bytes("POST", "/pools/web/servers", AUTHORISED, ADDED, len(ADDED)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_admin_requests_never_stop_a_running_balancer(
    live_balancer: LiveBalancer, data: bytes
) -> None:
    """Finding 12.1, by fuzzing: whatever reaches the admin port, the process serves on."""
    blocking_exchange(live_balancer.admin, data)
    assert live_balancer.process.poll() is None, live_balancer.stderr.read_text()[-3000:]
    healthz = blocking_exchange(live_balancer.admin, b"GET /healthz HTTP/1.1\r\n" + CLOSE)
    assert healthz.startswith(b"HTTP/1.1 200 OK\r\n")
    undo_servers(live_balancer)  # undo what the case may have changed: servers added or removed, ...
    for action in ("enable", "weight"):
        answer = live_balancer.admin_request("POST", f"/pools/web/servers/one/{action}", b'{"weight": 1}')
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    proxied = blocking_exchange(live_balancer.port, b"GET / HTTP/1.1\r\n" + CLOSE)
    assert b"hello from one" in proxied
    assert b"Traceback" not in live_balancer.stderr.read_bytes()


def undo_servers(live: LiveBalancer) -> None:
    """Back to the one server "one": those the case added are removed, "one" is added if it removed it."""
    stats = json.loads(live.admin_request("GET", "/stats").partition(b"\r\n\r\n")[2])
    names = [server["name"] for server in stats["pools"][0]["servers"]]
    for name in names:
        if name != "one":
            assert b" 200 OK" in live.admin_request("DELETE", f"/pools/web/servers/{quote(name, safe='')}")
    if "one" not in names:
        entry = json.dumps({"address": live.server, "name": "one"}).encode()
        assert b" 201 Created" in live.admin_request("POST", "/pools/web/servers", entry)


# ------------------------------------------------ token rotation (reload)


def write_admin_config(path: Path, port: int, admin: int, server: str, admin_keys: str) -> None:
    path.write_text(
        f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
        f'[pools.web]\nservers = ["{server}"]\nhealth = {{ check = "none" }}\n'
        f'[admin]\nbind = "127.0.0.1:{admin}"\n{admin_keys}\n'
    )


async def stats_status(admin: Address, token: str) -> int:
    return (await http(admin, "GET", "/stats", headers=(("Authorization", f"Bearer {token}"),)))[0]


@pytest.mark.slow
async def test_sighup_rotates_the_admin_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Finding 12.7: after SIGHUP with a new token the old one still worked and the new one got 401."""
    backend = await start_backend(nursery, name_handler("a"))
    port, admin_port = free_port(), free_port()
    admin = Address("127.0.0.1", admin_port)
    config, secret = tmp_path / "anubis.toml", tmp_path / "token"
    write_admin_config(config, port, admin_port, backend.address, 'token = "old-token"')
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(admin_port)
        assert await stats_status(admin, "old-token") == 200
        steps = [
            ("new-token", lambda: write_admin_config(config, port, admin_port, backend.address,
                                                     'token = "new-token"')),
            ("newer-token", lambda: (secret.write_text("newer-token\n"),  # as a mounted Secret reads
                                     write_admin_config(config, port, admin_port, backend.address,
                                                        f'token_file = "{secret}"'))),
            ("newest-token", lambda: secret.write_text("newest-token")),  # the Secret changes, not the config
        ]  # fmt: skip
        old = "old-token"
        for new, change in steps:
            change()
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(EVENTUALLY):
                while await stats_status(admin, new) != 200:
                    await trio.sleep(0.05)
            assert await stats_status(admin, old) == 401
            old = new
        assert (await http(admin, "GET", "/healthz"))[0] == 200
        assert await request(Address("127.0.0.1", port)) == b"a"


def admin_table(**admin: str) -> dict[str, Any]:
    return {"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:1"]}}, "admin": admin}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "keys", "message"),
    [
        (None, {"token": "a", "token_file": "SECRET"}, "admin.token_file: set token or token_file, not both"),
        (None, {"token_file": "SECRET"}, "admin.token_file: must name a readable regular file"),
        (b"", {"token_file": "SECRET"}, "admin.token_file: must hold one token"),
        (b"two words\n", {"token_file": "SECRET"}, "admin.token_file: must hold one token"),
        (b"x" * 5000, {"token_file": "SECRET"}, "admin.token_file: must hold one token"),
        (None, {"token": "caf\u00e9 s3cret"}, "admin.token: must be visible ASCII characters"),
    ],
)
def test_bad_tokens_are_config_errors_that_never_show_the_token(
    tmp_path: Path, content: bytes | None, keys: dict[str, str], message: str
) -> None:
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_bytes(content)
    keys = {k: str(secret) if v == "SECRET" else v for k, v in keys.items()}
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_config(admin_table(**keys), "t.toml")
    assert "s3cret" not in str(caught.value) and "two words" not in str(caught.value)


def test_token_file_is_read_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  k8s-secret-value\n")
    config = parse_config(admin_table(token_file=str(secret)), "t.toml")
    assert config.admin is not None and config.admin.token == "k8s-secret-value"


@given(st.text(max_size=30))
@settings(max_examples=100, deadline=None)
def test_every_token_the_config_accepts_can_be_sent(token: str) -> None:
    try:
        config = parse_config(admin_table(token=token), "t.toml")
    except ConfigError:
        return
    assert config.admin is not None
    assert authorised(config.admin.token, [(b"authorization", f"Bearer {token}".encode())])


@pytest.mark.slow
async def test_out_of_descriptors_the_admin_backs_off_and_logs_once_per_episode(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 12.6: the admin accept loop logged 209 EMFILE tracebacks in 20 s."""
    logging.getLogger("trioanubis").propagate = True
    one = await start_backend(nursery, name_handler("one"))
    with caplog.at_level(logging.INFO):
        async with running_balancer(admin_config([one.address])) as (b, address):
            admin, listener = b.admin_address, b.listeners["test"]
            assert admin is not None
            for _ in range(2):  # two episodes
                clients = [socket.socket(), socket.socket()]  # made while descriptors remain
                with descriptors_exhausted():
                    enough = listener.overloads + 5  # both accept loops retried a while
                    for client, target in zip(clients, (admin, address), strict=True):
                        client.connect((target.host, target.port))  # waits in the backlog
                    await wait_until(lambda n=enough: listener.overloads >= n)
                admin_client, proxy_client = (trio.SocketStream(trio.socket.from_stdlib_socket(c))
                                              for c in clients)  # fmt: skip
                async with admin_client, proxy_client:
                    await admin_client.send_all(b"GET /healthz HTTP/1.1\r\n" + CLOSE)
                    assert (await receive_all(admin_client)).startswith(b"HTTP/1.1 200 ")
                    await proxy_client.send_all(b"ping")
                    await proxy_client.send_eof()
                    assert await receive_all(proxy_client) == b"one"
    admin_lines = [r for r in caplog.records if r.name == "trioanubis.admin" and "accept" in r.getMessage()]
    assert [r.getMessage() for r in admin_lines] == [
        "admin: accept failed: Too many open files; backing off 0.1s and retrying",
        "admin: accepting again",
    ] * 2
    assert not [r for r in caplog.records if r.exc_info or r.name.startswith("trio.")]
