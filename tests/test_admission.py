"""Between accept and connect, over real sockets: the PROXY header, trusted peers, allow/deny, limits."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect,
    echo_handler,
    name_handler,
    no_fd_leak,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import admin_config, connect_from, exchange, http
from trioanubis.app import Balancer
from trioanubis.config import parse_config
from trioanubis.proxy.proxy_protocol import HeaderReader, build_header, build_local


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")

V1 = build_header("v1", ("192.0.2.7", 51234), ("198.51.100.1", 443))
V2 = build_header("v2", ("2001:db8::7", 4242), ("2001:db8::1", 443))


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """Wait (with a deadline) for the balancer to close: True on EOF or reset."""
    with trio.fail_after(EVENTUALLY):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


def proxied(servers: list[Any], **listener: Any) -> dict[str, Any]:
    options = {"accept_proxy": True, "proxy_trusted": ["127.0.0.1/32", "::1"], **listener}
    return config_for(servers, listener=options)


def access_clients(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.access["client"] for r in caplog.records if r.name == "trioanubis.access"]  # type: ignore[attr-defined]


def refused(balancer: Balancer, reason: str) -> int:
    return balancer.listeners["test"].admission.refused[reason]


# ------------------------------------------------------------ accept_proxy


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
async def test_a_trusted_peers_header_names_the_client_everywhere(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    backend = await start_backend(nursery, echo_handler)
    caplog.set_level(logging.INFO, logger="trioanubis")
    data = admin_config([backend.address])
    data["listeners"]["test"].update(accept_proxy=True, proxy_trusted=["127.0.0.0/8"])
    async with running_balancer(data) as (balancer, address):
        stream = await connect(address)
        await stream.send_all(header + b"hello")
        assert await stream.receive_some(5) == b"hello"  # the client's bytes, not the header's
        _, _, body = await http(balancer.admin_address, "GET", "/stats")  # type: ignore[arg-type]
        listener = json.loads(body)["listeners"][0]
        client = "192.0.2.7" if header is V1 else "2001:db8::7"
        assert listener["busiest_clients"] == [{"client": client, "active": 1}]
        assert await exchange(stream, b" world") == b" world"
        await wait_until(lambda: balancer.listeners["test"].active == 0)
    assert access_clients(caplog) == ["192.0.2.7:51234" if header is V1 else "[2001:db8::7]:4242"]
    assert backend.connections == 1


async def test_a_header_sent_byte_by_byte_is_read_and_nothing_after_it_is_lost(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    payload = bytes(range(256)) * 64
    async with running_balancer(proxied([backend.address])) as (balancer, address):
        for header in (V1, V2):
            stream = await connect(address)
            for byte in header:
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.001)  # pacing, so the bytes arrive in separate segments
            assert await exchange(stream, payload) == payload
        assert balancer.listeners["test"].admission.refused == dict.fromkeys(
            balancer.listeners["test"].admission.refused, 0
        )


async def test_a_local_or_unknown_header_keeps_the_peers_own_address(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery, echo_handler)
    caplog.set_level(logging.INFO, logger="trioanubis")
    async with running_balancer(proxied([backend.address])) as (_, address):
        for header in (build_local("v1"), build_local("v2")):
            stream = await connect(address)
            await stream.send_all(header)
            assert await exchange(stream) == b"ping"
        await wait_until(lambda: len(access_clients(caplog)) == 2)
    assert all(client.startswith("127.0.0.1:") for client in access_clients(caplog))


@pytest.mark.slow
async def test_a_header_that_never_comes_is_closed_after_proxy_timeout(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(proxied([backend.address], proxy_timeout="200ms")) as (balancer, address):
        silent = await connect(address)
        partial = await connect(address)
        await partial.send_all(V2[:10])
        assert await closed_by_peer(silent) and await closed_by_peer(partial)
        await silent.aclose()
        await partial.aclose()
        assert refused(balancer, "proxy_timeout") == 2
        await wait_until(lambda: balancer.listeners["test"].active == 0 and balancer.limits.active == 0)
        assert await exchange(await connect(address), V1 + b"still serving") == b"still serving"
    assert backend.connections == 1  # no server was contacted for the refused ones


@pytest.mark.slow
@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n", V2[:12] + b"\x99" + V2[13:],
     b"\r\n\r\n\x00"],
)
async def test_a_bad_or_truncated_header_is_refused(nursery: trio.Nursery, garbage: bytes) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(proxied([backend.address])) as (balancer, address):
        assert await exchange(await connect(address), garbage) is None
        await wait_until(lambda: refused(balancer, "proxy_header") == 1)
    assert backend.connections == 0


async def test_an_untrusted_peer_sending_a_valid_header_is_refused(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = proxied([backend.address], proxy_trusted=["10.0.0.0/8"])
    async with running_balancer(data) as (balancer, address):
        for _ in range(3):
            assert await exchange(await connect(address), V1 + b"hello") is None
        await wait_until(lambda: refused(balancer, "untrusted") == 3)
        assert balancer.listeners["test"].active == 0
    assert backend.connections == 0
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["listener test: refused 127.0.0.1: not in proxy_trusted"]  # once a minute per client


async def test_allow_and_deny_apply_to_the_client_the_header_names(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = proxied([backend.address], deny=["192.0.2.0/24"])
    async with running_balancer(data) as (balancer, address):
        assert await exchange(await connect(address), V1) is None  # 192.0.2.7: denied
        assert await exchange(await connect(address), V2 + b"ok") == b"ok"  # 2001:db8::7: allowed
        await wait_until(lambda: refused(balancer, "denied") == 1)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda h, n, tail: h[:n] + tail, st.sampled_from([V1, V2, build_local("v2")]),
              st.integers(0, 60), st.binary(max_size=40)),
))  # fmt: skip
async def test_any_header_bytes_leave_the_balancer_serving(data: bytes) -> None:
    # Each client half-closes after its bytes, so no header waits for proxy_timeout; a short one
    # would only fail the second, well-formed client when the machine stalls the process that long.
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        async with running_balancer(proxied([backend.address], proxy_timeout="30s")) as (balancer, address):
            stream = await connect(address)
            await exchange(stream, data)
            reader = HeaderReader()
            reader.feed(data)
            if reader.failed:
                await wait_until(lambda: refused(balancer, "proxy_header") == 1)
            assert await exchange(await connect(address), V2 + b"alive") == b"alive"
            await wait_until(lambda: balancer.limits.active == 0)
        nursery.cancel_scope.cancel()


# -------------------------------------------------------------- allow/deny


def two_listeners(servers: list[str], **options: Any) -> dict[str, Any]:
    data = config_for(servers, listener=options)
    data["listeners"]["six"] = {"bind": "[::1]:0", "pool": "test", **options}
    return data


@needs_ipv6
async def test_allow_and_deny_with_ipv4_and_ipv6_clients(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = two_listeners([backend.address], allow=["127.0.0.0/8", "::1/128"], deny=["127.0.0.2"])
    async with running_balancer(data) as (balancer, four):
        six = balancer.listeners["six"].bound
        assert six is not None
        assert await exchange(await connect_from("127.0.0.1", four)) == b"ping"
        assert await exchange(await connect_from("127.0.0.2", four)) is None  # deny wins over allow
        assert await exchange(await connect_from("::1", six)) == b"ping"
        assert balancer.listeners["test"].admission.refused["denied"] == 1
        # Deny ::1 instead, and allow only 127.0.0.2: the reload applies to new clients at once.
        new = two_listeners([backend.address], allow=["127.0.0.2/32"], deny=["::1"])
        await balancer.apply_config(parse_config(new, "test.toml"))
        assert await exchange(await connect_from("127.0.0.2", four)) == b"ping"
        assert await exchange(await connect_from("127.0.0.1", four)) is None  # not allowed
        assert await exchange(await connect_from("::1", six)) is None
        assert balancer.listeners["six"].admission.refused["denied"] == 1
        assert balancer.listeners["test"].admission.refused["denied"] == 2
    assert backend.connections == 3


async def test_refusals_are_logged_once_per_client_and_counted_in_metrics(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = admin_config([backend.address])
    data["listeners"]["test"]["deny"] = ["127.0.0.2", "127.0.0.3"]
    async with running_balancer(data) as (balancer, address):
        for source in ("127.0.0.2", "127.0.0.3") * 5:
            assert await exchange(await connect_from(source, address)) is None
        _, _, body = await http(balancer.admin_address, "GET", "/metrics")  # type: ignore[arg-type]
    assert 'anubis_listener_refused_total{listener="test",reason="denied"} 10' in body.decode()
    assert 'anubis_listener_refused_total{listener="test",reason="client_rate"} 0' in body.decode()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert sorted(lines) == [f"listener test: refused 127.0.0.{n}: denied by allow/deny" for n in (2, 3)]


# ------------------------------------------------------------------ limits


async def test_max_connections_per_client(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address], listener={"max_connections_per_client": 2})
    async with running_balancer(data) as (balancer, address):
        held = [await connect_from("127.0.0.2", address) for _ in range(2)]
        for stream in held:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        assert await exchange(await connect_from("127.0.0.2", address)) is None  # the third
        assert await exchange(await connect_from("127.0.0.3", address)) == b"ping"  # another client
        await held.pop().aclose()
        await wait_until(lambda: balancer.listeners["test"].admission.clients.active.get("127.0.0.2") == 1)
        assert await exchange(await connect_from("127.0.0.2", address)) == b"ping"
        await held.pop().aclose()
        await wait_until(lambda: not balancer.listeners["test"].admission.clients.active)
        assert balancer.listeners["test"].admission.refused["client_connections"] == 1


@pytest.mark.slow
async def test_the_rate_limit_holds_under_a_burst_of_1000_connections(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address], listener={"rate_per_client": "50/m"})
    served = 0
    async with running_balancer(data) as (balancer, address):
        started = trio.current_time()

        async def client(limiter: trio.CapacityLimiter) -> None:
            nonlocal served
            async with limiter:
                if await exchange(await connect(address)) == b"ping":
                    served += 1

        limiter = trio.CapacityLimiter(50)
        async with trio.open_nursery() as clients:
            for _ in range(1000):
                clients.start_soon(client, limiter)
        elapsed = trio.current_time() - started
        listener = balancer.listeners["test"]
        await wait_until(lambda: listener.active == 0)
        refused_count = listener.admission.refused["client_rate"]
    bound = 50 + elapsed * 50 / 60  # the bucket, plus what refilled meanwhile
    assert 50 <= served <= bound + 1, (served, elapsed)
    assert served + refused_count == 1000 == listener.accepted
    assert backend.connections == served


async def test_health_checks_send_no_header_unless_asked(nursery: trio.Nursery) -> None:
    first_bytes: list[bytes] = []

    async def record_first_bytes(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:
                pass
            first_bytes.append(data)

    backend = await start_backend(nursery, record_first_bytes)
    for send_proxy, expected in ((False, b""), (True, build_local("v1"))):
        health = {"check": "tcp", "interval": "50ms", "send_proxy": send_proxy}
        data = config_for([backend.address], send_proxy="v1", health=health)
        if not send_proxy:
            del data["pools"]["test"]["health"]["send_proxy"]
        first_bytes.clear()
        async with running_balancer(data):
            await wait_until(lambda: len(first_bytes) >= 2)
        assert set(first_bytes) == {expected}


async def test_send_proxy_names_the_real_client_and_where_it_connected(nursery: trio.Nursery) -> None:
    headers: list[bytes] = []

    async def read_header(stream: trio.SocketStream) -> None:
        async with stream:
            reader = HeaderReader()
            data = b""
            while not (reader.done or reader.failed):
                chunk = await stream.receive_some(1)
                data += chunk
                reader.feed(chunk)
            headers.append(data)
            await echo_handler(stream)

    backend = await start_backend(nursery, read_header)
    data = config_for([backend.address], send_proxy="v2")
    async with running_balancer(data) as (_, address):
        stream = await connect_from("127.0.0.2", address)
        local_port = stream.socket.getsockname()[1]
        assert await exchange(stream) == b"ping"
    assert headers == [build_header("v2", ("127.0.0.2", local_port), ("127.0.0.1", address.port))]
    # Behind accept_proxy, the header forwarded is the one received (its client, its destination).
    headers.clear()
    data = proxied([{"address": backend.address, "send_proxy": "v1"}])
    async with running_balancer(data) as (_, address):
        assert await exchange(await connect(address), V2 + b"x") == b"x"
    assert headers == [build_header("v1", ("2001:db8::7", 4242), ("2001:db8::1", 443))]


@pytest.mark.pure_python
async def test_a_plain_listener_never_calls_into_admission(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the plain accept path called into admission")

    for name in ("at_accept", "admit", "release", "refuse"):
        monkeypatch.setattr(f"trioanubis.proxy.admission.Admission.{name}", fail)
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        for _ in range(3):
            assert await request(address) == b"ping"
        await wait_until(lambda: balancer.listeners["test"].active == 0)
        assert balancer.listeners["test"].internal_errors == 0


@pytest.mark.slow
async def test_source_hash_hashes_the_client_the_header_names(nursery: trio.Nursery) -> None:
    names = [f"s{i}" for i in range(3)]
    backends = [await start_backend(nursery, name_handler(n), n) for n in names]
    servers = [{"address": b.address, "name": b.name} for b in backends]
    data = proxied(servers)
    data["pools"]["test"]["strategy"] = "source_hash"
    clients = [f"192.0.2.{i}" for i in range(1, 31)]
    async with running_balancer(data) as (_, address):

        async def served_by(client: str) -> bytes | None:
            header = build_header("v1", (client, 1000), ("198.51.100.1", 443))
            return await exchange(await connect(address), header)

        first = {client: await served_by(client) for client in clients}
        again = {client: await served_by(client) for client in reversed(clients)}
    assert first == again  # each header client sticks to its server, though every peer is 127.0.0.1
    assert len(set(first.values())) == 3  # and 30 header clients spread over all three


@pytest.mark.slow
async def test_refused_connections_of_every_kind_leave_no_descriptor_behind(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = proxied([backend.address], proxy_timeout="100ms", deny=["192.0.2.0/24"],
                   max_connections_per_client=1, rate_per_client="2/h")  # fmt: skip
    with no_fd_leak():
        async with running_balancer(data) as (balancer, address):
            admission = balancer.listeners["test"].admission
            assert await exchange(await connect(address), b"garbage") is None  # proxy_header
            silent = await connect(address)
            assert await closed_by_peer(silent)  # proxy_timeout
            await silent.aclose()
            assert await exchange(await connect(address), V1) is None  # denied
            held = await connect(address)
            await held.send_all(V2 + b"x")
            assert await held.receive_some(1) == b"x"
            assert await exchange(await connect(address), V2) is None  # client_connections
            await held.aclose()
            await wait_until(lambda: not admission.clients.active)
            assert await exchange(await connect(address), V2 + b"y") == b"y"
            # client_rate: 2/h, both tokens used (the refusal by connection count took none)
            assert await exchange(await connect(address), V2 + b"z") is None
            await wait_until(lambda: balancer.limits.active == 0)
            assert {k: v for k, v in admission.refused.items() if v} == {
                "proxy_header": 1, "proxy_timeout": 1, "denied": 1, "client_connections": 1, "client_rate": 1,
            }
            assert balancer.listeners["test"].active == 0 and not admission.clients.active
