"""SNI routing, TLS termination and origination, through a real balancer on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    EVENTUALLY,
    closed_without_answer,
    connect,
    connect_when_listening,
    echo_handler,
    free_port,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import ANUBIS, http, real_hello
from tests.tlscerts import Authority, Pair
from trioanubis.config import Address, parse_config
from trioanubis.errors import ConfigError


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def server_context(pair: Pair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return context


def tls_backend(pair: Pair, name: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A TLS server that says its name, then echoes until EOF (close_notify), then closes cleanly."""
    context = server_context(pair)

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            await tls.send_all(f"{name}\n".encode())
            while data := await tls.receive_some(65536):
                await tls.send_all(data)
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(tls)

    return handler


async def tls_client(address: Address, ca: Authority, name: str | None) -> trio.SSLStream[trio.SocketStream]:
    context = ssl.create_default_context(cafile=ca.pair.cert)
    raw = await connect(address)
    stream = trio.SSLStream(raw, context, server_hostname=name, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(raw)  # a refused handshake must not leave the socket open
        raise
    return stream


async def first_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(100)
        assert chunk, data
        data += chunk
    return data


def sni_config(pools: dict[str, list[str]], routes: list[dict[str, str]], **listener: Any) -> dict[str, Any]:
    return {
        "listeners": {"tls": {"bind": "127.0.0.1:0", "routes": routes, **listener}},
        "pools": {name: {"servers": servers, "health": {"check": "none"}} for name, servers in pools.items()},
    }


async def test_sni_routes_each_name_to_its_backend_end_to_end(nursery: trio.Nursery, ca: Authority) -> None:
    api = await start_backend(nursery, tls_backend(ca.issue("api.example.com"), "api"))
    web = await start_backend(nursery, tls_backend(ca.issue("*.example.com"), "web"))
    plain = await start_backend(nursery, echo_handler)
    routes = [{"sni": "API.example.com", "pool": "api"}, {"sni": "*.example.com", "pool": "web"}]
    data = sni_config({"api": [api.address], "web": [web.address], "plain": [plain.address]}, routes,
                      pool="plain")  # fmt: skip
    async with running_balancer(data) as (balancer, address):
        for name, expected in (("api.example.com", b"api\n"), ("www.example.com", b"web\n")):
            stream = await tls_client(address, ca, name)  # verifies the backend's own certificate
            assert await first_line(stream) == expected
            await stream.send_all(b"x" * 100_000)
            echoed = b""
            while len(echoed) < 100_000:
                echoed += await stream.receive_some(65536)
            assert echoed == b"x" * 100_000
            await stream.aclose()
        assert await request(address, b"not tls at all") == b"not tls at all"  # the fallback pool
        counts = balancer.listeners["tls"].tls_counts
        assert (counts["routed"], counts["not_tls"]) == (2, 1)


async def test_a_hello_split_into_bytes_is_routed_and_relayed_unchanged(nursery: trio.Nursery,
                                                                        ca: Authority) -> None:  # fmt: skip
    received: list[bytes] = []

    async def recorder(stream: trio.SocketStream) -> None:
        received.append(await receive_all(stream))
        await stream.aclose()

    backend = await start_backend(nursery, recorder)
    hello = real_hello("split.example.com", ["h2"])
    data = sni_config({"p": [backend.address]}, [{"sni": "split.example.com", "pool": "p", "alpn": "h2"}])
    async with running_balancer(data) as (_, address):
        stream = await connect(address)
        for byte in hello:
            await stream.send_all(bytes([byte]))
        await stream.send_all(b"trailing")
        await stream.send_eof()
        await wait_until(lambda: bool(received))
        await stream.aclose()
    assert received == [hello + b"trailing"]


@pytest.mark.slow
async def test_no_route_no_fallback_silence_and_garbage_are_closed(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = sni_config({"p": [backend.address]}, [{"sni": "only.test", "pool": "p"}], peek_timeout="200ms")
    async with running_balancer(data) as (balancer, address):
        assert await closed_without_answer(address)  # sends nothing: closed after peek_timeout
        assert await request(address, b"GET / HTTP/1.0\r\n\r\n") == b""  # not TLS, no fallback
        assert await request(address, real_hello("other.test")) == b""  # no route, no fallback
        rng = random.Random(16)
        for _ in range(60):  # mutated and truncated hellos: closed, and the listener keeps serving
            hello = bytearray(real_hello("only.test", ["h2"]))
            for _ in range(rng.randint(1, 6)):
                hello[rng.randrange(len(hello))] = rng.randrange(256)
            stream = await connect(address)
            await stream.send_all(bytes(hello[: rng.randint(1, len(hello))]))
            await stream.aclose()
        counts = balancer.listeners["tls"].tls_counts
        assert counts["peek_timeout"] >= 1 and counts["no_route"] >= 2
        assert (await request(address, real_hello("only.test"))).startswith(real_hello("only.test")[:5])
        assert backend.connections >= 1


@pytest.mark.slow
async def test_termination_relays_plaintext_with_half_close(nursery: trio.Nursery, ca: Authority) -> None:
    backend = await start_backend(nursery, echo_handler)
    pair = ca.issue("localhost", "127.0.0.1")
    tls = {"cert": pair.cert, "key": pair.key}
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p", "tls": tls}},
            "pools": {"p": {"servers": [backend.address], "health": {"check": "none"}}}}  # fmt: skip
    async with running_balancer(data) as (_, address):
        context = ssl.create_default_context(cafile=ca.pair.cert)
        raw = await connect(address)
        tls = trio.SSLStream(raw, context, server_hostname="localhost")
        payload = random.Random(1).randbytes(3_000_000)
        async with trio.open_nursery() as inner:
            async def send() -> None:
                await tls.send_all(payload)

            inner.start_soon(send)
            echoed = b""
            while len(echoed) < len(payload):
                echoed += await tls.receive_some(65536)
        assert echoed == payload
        plain, _ = await tls.unwrap()  # close_notify: the backend sees EOF and echoes EOF back
        await plain.aclose()
    assert backend.connections == 1


async def test_origination_refuses_a_bad_certificate_and_fails_over(nursery: trio.Nursery, ca: Authority,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    other = Authority(tmp_path, "other-ca")
    old = ca.issue("127.0.0.1", expired=True, file="old")
    expired = await start_backend(nursery, tls_backend(old, "old"))
    stranger = await start_backend(nursery, tls_backend(other.issue("127.0.0.1", file="x"), "stranger"))
    good = await start_backend(nursery, tls_backend(ca.issue("127.0.0.1", file="good"), "good"))
    servers = [{"address": b.address, "name": b.name} for b, b.name in
               ((expired, "expired"), (stranger, "stranger"), (good, "good"))]  # type: ignore[misc]
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": servers, "health": {"check": "none"}, "retries": 2,
                            "tls": {"ca": ca.pair.cert}}}}  # fmt: skip
    async with running_balancer(data) as (balancer, address):
        for _ in range(3):
            stream = await connect(address)
            assert await first_line(stream) == b"good\n"
            await stream.aclose()
        failures = {s.name: s.connect_failures for s in balancer.pools["p"].servers}
        assert failures["expired"] >= 1 and failures["stranger"] >= 1 and failures["good"] == 0


async def test_origination_accepts_what_haproxy_accepts_on_every_python(nursery: trio.Nursery, ca: Authority,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """A private CA's server certificate without an Authority Key Identifier verifies (as in
    HAProxy, nginx and curl), and a CA file holding only an intermediate is not a trust anchor:
    Python 3.13's default contexts do the opposite of both (VERIFY_X509_STRICT, _PARTIAL_CHAIN),
    and the balancer clears them so a config verifies the same on every Python."""
    certificate = ca.issue("127.0.0.1", file="bare", authority_key_id=False)
    bare = await start_backend(nursery, tls_backend(certificate, "no AKI"))
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": [bare.address], "health": {"check": "none"}, "retries": 0,
                            "tls": {"ca": ca.pair.cert}}}}  # fmt: skip
    async with running_balancer(data) as (balancer, address):
        stream = await connect(address)
        assert await first_line(stream) == b"no AKI\n"
        await stream.aclose()
        tls = balancer.pools["p"].config.tls
        assert tls is not None
        context = tls.context
    assert not context.verify_flags & (ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN)


async def test_health_checks_speak_tls_and_fail_a_bad_certificate(nursery: trio.Nursery,
                                                                  ca: Authority) -> None:  # fmt: skip
    old = ca.issue("127.0.0.1", expired=True, file="old")
    expired = await start_backend(nursery, tls_backend(old, "old"))
    good = await start_backend(nursery, tls_backend(ca.issue("127.0.0.1", file="good"), "good"))
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": [expired.address, good.address], "tls": {"ca": ca.pair.cert},
                            "health": {"check": "tcp", "interval": "100ms", "fall": 1}}}}  # fmt: skip
    async with running_balancer(data) as (balancer, _):
        servers = balancer.pools["p"].servers
        await wait_until(lambda: [s.healthy for s in servers] == [False, True])
        assert "certificate" in servers[0].last_check


def test_config_errors_name_the_key(tmp_path: Path, ca: Authority) -> None:
    pair, other = ca.issue("a.test"), ca.issue("b.test")
    base = {"pools": {"p": {"servers": ["127.0.0.1:1"]}}}

    def error(listener: dict[str, Any], pool: dict[str, Any] | None = None) -> str:
        data = {"listeners": {"l": {"bind": ":0", **listener}},
                "pools": {"p": {"servers": ["127.0.0.1:1"], **(pool or {})}}}  # fmt: skip
        with pytest.raises(ConfigError) as info:
            parse_config(data, "t.toml")
        return str(info.value)

    assert "listeners.l.routes[0].sni" in error({"routes": [{"sni": "a.*.b", "pool": "p"}]})
    assert "listeners.l.routes[1].pool: names pool 'q'" in error(
        {"routes": [{"sni": "a.b", "pool": "p"}, {"sni": "c.d", "pool": "q"}]})
    assert "listeners.l.tls: key:" in error({"pool": "p", "tls": {"cert": pair.cert, "key": other.key}})
    assert "no such file" in error({"pool": "p", "tls": {"cert": pair.cert + "x", "key": pair.key}})
    two = [{"cert": pair.cert, "key": pair.key}, {"crt": "x"}]
    assert "listeners.l.tls[1].crt: unknown key" in error({"pool": "p", "tls": two})
    assert "pools.p.tls: ca: no such file" in error({"pool": "p"}, {"tls": {"ca": "/nonexistent"}})
    assert "listeners.l.peek_timeout: has no effect" in error({"pool": "p", "peek_timeout": "1s"})
    both = [{"cert": pair.cert, "key": pair.key}, {"cert": other.cert, "key": other.key}]
    routes = [{"sni": "*.A.test", "pool": "p"}]
    ok = parse_config({**base, "listeners": {"l": {"bind": ":0", "routes": routes, "tls": both}}})
    assert ok.listeners["l"].routes[0].sni == "*.a.test" and ok.listeners["l"].pool == ""


@pytest.mark.slow
async def test_several_certificates_are_chosen_by_name(nursery: trio.Nursery, ca: Authority) -> None:
    backend = await start_backend(nursery, echo_handler)
    a, b = ca.issue("a.test"), ca.issue("b.test")
    tls = [{"cert": a.cert, "key": a.key}, {"cert": b.cert, "key": b.key}]
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p", "tls": tls}},
            "pools": {"p": {"servers": [backend.address], "health": {"check": "none"}}}}  # fmt: skip
    async with running_balancer(data) as (_, address):
        for name in ("a.test", "b.test"):
            stream = await tls_client(address, ca, name)  # verifies: the certificate for that name
            await stream.send_all(b"hi")
            assert await stream.receive_some(10) == b"hi"
            await stream.aclose()


async def stdout_line(process: trio.Process, wanted: str) -> str:
    """Read the process's stdout until a line containing `wanted`."""
    assert process.stdout is not None
    data = b""
    with trio.fail_after(EVENTUALLY):
        while wanted.encode() not in data:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, data
            data += chunk
    return next(line for line in data.decode().splitlines() if wanted in line)


@pytest.mark.slow
async def test_proxy_tls_makes_a_certificate_once_and_prints_its_fingerprint(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    fingerprints = []
    for _ in range(2):
        port = free_port()
        argv = [*ANUBIS, "proxy", "--tls", f"127.0.0.1:{port}", backend.address]
        process = await trio.lowlevel.open_process(argv, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            fingerprints.append(await stdout_line(process, "fingerprint"))
            cert = tmp_path / "trioanubis" / "localhost.crt"
            context = ssl.create_default_context(cafile=str(cert))
            raw = await connect_when_listening(port)
            stream = trio.SSLStream(raw, context, server_hostname="localhost")
            await stream.send_all(b"over tls")
            assert await stream.receive_some(100) == b"over tls"
            der = stream.getpeercert(binary_form=True)
            assert der is not None
            digest = hashlib.sha256(der).hexdigest().upper()
            assert ":".join(digest[i : i + 2] for i in range(0, 64, 2)) in fingerprints[-1]
            await stream.aclose()
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await process.wait()
        assert process.returncode == 0
    assert fingerprints[0] == fingerprints[1]  # made once, then reused


@pytest.mark.slow
async def test_sighup_picks_up_renewed_certificate_files(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, echo_handler)
    first, second = Authority(tmp_path, "first-ca"), Authority(tmp_path, "second-ca")
    pair = first.issue("localhost", file="live")
    port = free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(f"""
[listeners.t]
bind = "127.0.0.1:{port}"
pool = "p"
tls = {{ cert = "{pair.cert}", key = "{pair.key}" }}
[pools.p]
servers = ["{backend.address}"]
""")
    process = await trio.lowlevel.open_process([*ANUBIS, "run", "-c", str(config)], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        await (await connect_when_listening(port)).aclose()

        async def handshake(ca: Authority) -> bool:
            try:
                stream = await tls_client(Address("127.0.0.1", port), ca, "localhost")
            except trio.BrokenResourceError:
                return False
            await stream.aclose()
            return True

        assert await handshake(first)
        second.issue("localhost", file="live")  # renewed in place, by another CA
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(EVENTUALLY):
            while not await handshake(second):
                await trio.sleep(0.05)
        assert not await handshake(first)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert process.returncode == 0


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(0, 400), st.binary(max_size=60))
async def test_any_first_bytes_leave_an_sni_listener_serving(garbage: bytes, cut: int, tail: bytes) -> None:
    hello = real_hello("ok.example.com", ["h2"])
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        data = sni_config({"p": [backend.address]}, [{"sni": "ok.example.com", "pool": "p"}],
                          peek_timeout="100ms")  # fmt: skip
        async with running_balancer(data) as (balancer, address):
            for first in (garbage, hello[:cut] + tail):
                stream = await connect(address)
                with trio.move_on_after(5):
                    await stream.send_all(first)
                    await stream.send_eof()
                    with contextlib.suppress(trio.BrokenResourceError):
                        await receive_all(stream)
                await stream.aclose()
            assert (await request(address, hello))[:len(hello)] == hello  # still routing
            await wait_until(lambda: balancer.limits.active == 0)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_routes_behind_accept_proxy_and_a_reload_that_changes_them(nursery: trio.Nursery) -> None:
    received: dict[str, list[bytes]] = {"a": [], "b": []}

    def recorder(name: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handler(stream: trio.SocketStream) -> None:
            received[name].append(await receive_all(stream))
            await stream.aclose()

        return handler

    a = await start_backend(nursery, recorder("a"))
    b = await start_backend(nursery, recorder("b"))
    routes = [{"sni": "x.test", "pool": "a"}]
    data = sni_config({"a": [a.address], "b": [b.address]}, routes, accept_proxy=True,
                      proxy_trusted=["127.0.0.1/32"])  # fmt: skip
    hello = real_hello("x.test")
    header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 443\r\n"
    async with running_balancer(data) as (balancer, address):
        assert await request(address, header + hello) == b""
        await wait_until(lambda: received["a"] == [hello])
        data["listeners"]["tls"]["routes"] = [{"sni": "*.test", "pool": "b"}]
        await balancer.apply_config(parse_config(data, "test.toml"))
        assert await request(address, header + hello) == b""
        await wait_until(lambda: received["b"] == [hello])


@pytest.mark.slow
def test_check_rejects_a_key_that_is_not_the_certificates(tmp_path: Path, ca: Authority) -> None:
    pair, other = ca.issue("a.test"), ca.issue("b.test")
    config = tmp_path / "anubis.toml"
    config.write_text(f"""
[listeners.t]
bind = ":8443"
pool = "p"
tls = {{ cert = "{pair.cert}", key = "{other.key}" }}
[pools.p]
servers = ["127.0.0.1:1"]
""")
    result = subprocess.run([*ANUBIS, "check", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"listeners.t.tls: key: '{other.key}' is not the key of the certificate" in result.stderr
    assert "Traceback" not in result.stderr


ROUTE = st.fixed_dictionaries({"sni": st.text(max_size=30), "pool": st.sampled_from(["p", "q", ""])},
                              optional={"alpn": st.text(max_size=5), "x": st.integers()})  # fmt: skip


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(ROUTE, max_size=4), st.one_of(st.none(), st.text(max_size=10), st.integers(-5, 5)))
def test_any_routes_are_accepted_or_rejected_with_a_config_error(routes: list[dict[str, Any]],
                                                                 peek: object) -> None:  # fmt: skip
    listener: dict[str, Any] = {"bind": ":0", "routes": routes}
    if peek is not None:
        listener["peek_timeout"] = peek
    data = {"listeners": {"l": listener}, "pools": {"p": {"servers": ["127.0.0.1:1"]}}}
    try:
        config = parse_config(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: listeners.l")
        return
    assert all(route.pool == "p" for route in config.listeners["l"].routes)


@pytest.mark.slow
async def test_stats_and_metrics_count_the_openings(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = sni_config({"p": [backend.address]}, [{"sni": "a.test", "pool": "p"}], pool="p")
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (balancer, address):
        assert await request(address, b"plain") == b"plain"
        hello = real_hello("a.test")
        assert (await request(address, hello))[: len(hello)] == hello
        admin = balancer.admin_address
        assert admin is not None
        _, _, stats = await http(admin, "GET", "/stats")
        _, _, metrics = await http(admin, "GET", "/metrics")
    listener = json.loads(stats)["listeners"][0]
    assert (listener["pool"], listener["tls"]["routed"], listener["tls"]["not_tls"]) == ("p", 1, 1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
    counts = {s.labels["result"]: s.value for s in families["anubis_listener_tls"].samples}
    assert (counts["routed"], counts["not_tls"], counts["peek_timeout"]) == (1, 1, 0)


async def test_a_client_s_early_bytes_go_through_the_originated_tls(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Bytes the client sent before its connection's task ran are read before connecting
    (`read_early`) and reach a TLS server after the handshake, in order and counted."""
    ca = Authority(tmp_path)
    backend = await start_backend(nursery, tls_backend(ca.issue("127.0.0.1", file="s"), "srv"))
    data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": [backend.address], "health": {"check": "none"},
                            "tls": {"ca": ca.pair.cert}}}}  # fmt: skip
    payload = os.urandom(40000)
    async with running_balancer(data) as (balancer, address):
        sock = socket.create_connection((address.host, address.port))
        sock.sendall(payload)  # before the balancer's loop runs again: there at accept
        sock.shutdown(socket.SHUT_WR)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with stream:
            with trio.fail_after(EVENTUALLY):
                assert await receive_all(stream) == b"srv\n" + payload
        server = balancer.pools["p"].servers[0]
        await wait_until(lambda: server.total == 1 and not server.active)
        assert server.bytes_in == len(payload)
