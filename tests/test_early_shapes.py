"""Client and server shapes around the early read (proxy/connection.py's `read_early`): every byte
in order, every count back to 0, on either backend. From the hostile review of the change; the
access-log records are read through a patched method, so the compiled build skips these."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import Any

import pytest
import trio

from tests.conftest import (
    EVENTUALLY,
    config_for,
    echo_handler,
    free_port,
    no_fd_leak,
    receive_all,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.ops import accesslog

pytestmark = pytest.mark.pure_python  # patches the access log's method, which compiled callers skip

RECORDS: list[tuple[str, int, int]] = []


@pytest.fixture(autouse=True)
def _records(monkeypatch: pytest.MonkeyPatch) -> None:
    RECORDS.clear()
    original = accesslog.AccessLog.log

    def log(self: Any, record: Any) -> None:
        RECORDS.append((record.end, record.bytes_in, record.bytes_out))
        original(self, record)

    monkeypatch.setattr(accesslog.AccessLog, "log", log)


def early_client(address: Any, payload: bytes, *, fin: bool = False, rst: bool = False) -> socket.socket:
    """Blocking connect + send while the loop is blocked: the bytes are in the kernel before accept."""
    sock = socket.create_connection((address.host, address.port))
    if payload:
        sock.sendall(payload)
    if fin:
        sock.shutdown(socket.SHUT_WR)
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return sock


async def read_to_eof(sock: socket.socket) -> bytes:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with stream:
        with trio.fail_after(EVENTUALLY):
            return await receive_all(stream)


async def settle(balancer: Any, n: int) -> None:
    await wait_until(lambda: len(RECORDS) >= n)
    await wait_until(lambda: all(not s.active for p in balancer.pools.values() for s in p.servers))


@pytest.mark.parametrize("size", [1, 100, 16384, 16385, 1 << 20])
async def test_data_then_fin(nursery: trio.Nursery, size: int) -> None:
    backend = await start_backend(nursery, echo_handler)
    payload = os.urandom(size)
    with no_fd_leak():
        async with running_balancer(config_for([backend.address])) as (balancer, address):
            sock = early_client(address, payload[: min(size, 200000)], fin=size <= 200000)
            if size > 200000:
                s = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                async with trio.open_nursery() as n:
                    async def rest() -> None:
                        await s.send_all(payload[200000:])
                        await s.send_eof()
                    n.start_soon(rest)
                    got = bytearray()
                    with trio.fail_after(EVENTUALLY):
                        while chunk := await s.receive_some(65536):
                            got += chunk
                await s.aclose()
                echoed = bytes(got)
            else:
                echoed = await read_to_eof(sock)
            assert echoed == payload
            await settle(balancer, 1)
            server = balancer.pools["test"].servers[0]
            assert (server.bytes_in, server.bytes_out) == (size, size)
            assert [("client_eof", size, size)] == RECORDS


async def test_only_fin(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        sock = early_client(address, b"", fin=True)
        assert await read_to_eof(sock) == b""
        await settle(balancer, 1)
        assert RECORDS == [("client_eof", 0, 0)]


async def test_data_then_rst(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        early_client(address, b"x" * 500, rst=True)
        await settle(balancer, 1)
        assert RECORDS[0][0] == "client_reset", RECORDS
        assert balancer.limits.active == 0


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_server_leaves_at_accept(nursery: trio.Nursery, how: str) -> None:
    async def leave(stream: trio.SocketStream) -> None:
        if how == "reset":
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    backend = await start_backend(nursery, leave)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        sock = early_client(address, b"hello" * 10)
        with contextlib.suppress(trio.BrokenResourceError):
            await read_to_eof(sock)
        await settle(balancer, 1)
        assert len(RECORDS) == 1 and RECORDS[0][1] == 50  # the early bytes, counted once
        assert balancer.limits.active == 0


async def test_server_speaks_first_and_client_too(nursery: trio.Nursery) -> None:
    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hi\r\n")
        await echo_handler(stream)

    backend = await start_backend(nursery, greet)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        sock = early_client(address, b"EHLO x\r\n", fin=True)
        assert await read_to_eof(sock) == b"220 hi\r\nEHLO x\r\n"
        await settle(balancer, 1)
        assert RECORDS == [("client_eof", 8, 16)]


async def test_failover_keeps_early_bytes(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    refusing = f"127.0.0.1:{free_port()}"
    data = config_for([refusing, backend.address], retries=2, strategy="round_robin")
    async with running_balancer(data) as (balancer, address):
        for _i in range(4):
            payload = os.urandom(5000)
            sock = early_client(address, payload, fin=True)
            assert await read_to_eof(sock) == payload
        await settle(balancer, 4)
        assert [r[0] for r in RECORDS] == ["client_eof"] * 4, RECORDS


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_then_early(nursery: trio.Nursery, version: str) -> None:
    got: list[bytes] = []

    async def keep(stream: trio.SocketStream) -> None:
        got.append(await receive_all(stream))
        await stream.aclose()

    backend = await start_backend(nursery, keep)
    async with running_balancer(config_for([backend.address], send_proxy=version)) as (_balancer, address):
        sock = early_client(address, b"PAYLOAD-" * 1000, fin=True)
        assert await read_to_eof(sock) == b""
        await wait_until(lambda: bool(got))
    assert got[0].endswith(b"PAYLOAD-" * 1000)
    head = got[0][: -8000]
    assert head.startswith(b"PROXY TCP4") or head.startswith(b"\r\n\r\n\x00\r\nQUIT\n"), head


async def test_many_concurrent_early_clients(nursery: trio.Nursery) -> None:
    """Batches: many relays started while the dispatcher is busy (the `_held` path)."""
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        results: list[bool] = []

        async def one(i: int) -> None:
            payload = (b"%06d" % i) * 300
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                results.append(await receive_all(stream) == payload)

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(one, i)
        assert results == [True] * 300
        await settle(balancer, 300)
        assert balancer.limits.active == 0


@pytest.mark.parametrize("abort_on_close", [False, True])
async def test_held_client_with_early_bytes_served_when_server_comes_up(abort_on_close: bool) -> None:
    port = free_port()
    health = {"check": "tcp", "interval": "200ms", "timeout": "500ms", "rise": 1, "fall": 1}
    data = config_for([f"127.0.0.1:{port}"], health=health, queue_timeout="20s",
                      abort_on_close=abort_on_close)
    payload = os.urandom(3000)
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        await wait_until(lambda: not pool.servers[0].up if hasattr(pool.servers[0], "up") else True)
        sock = early_client(address, payload, fin=not abort_on_close)
        await wait_until(lambda: len(pool.held) == 1)
        await trio.sleep(1.5)  # a few gone checks while held
        assert len(pool.held) == 1
        async with trio.open_nursery() as nursery:
            await start_backend(nursery, echo_handler, port=port)
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            got = bytearray()
            with trio.fail_after(EVENTUALLY):
                while len(got) < len(payload):
                    got += await stream.receive_some(65536)
            assert bytes(got) == payload
            await stream.send_eof()
            with trio.fail_after(EVENTUALLY):
                assert await receive_all(stream) == b""
            await stream.aclose()
            await settle(balancer, 1)
            nursery.cancel_scope.cancel()
        assert RECORDS == [("client_eof", 3000, 3000)], RECORDS


@pytest.mark.parametrize("rate", [False, True])
async def test_mirror_gets_early_bytes_without_header(nursery: trio.Nursery, rate: bool) -> None:
    copies: list[bytes] = []

    async def keep(stream: trio.SocketStream) -> None:
        copies.append(await receive_all(stream))

    primary = await start_backend(nursery, echo_handler)
    shadow = await start_backend(nursery, keep)
    extra: dict[str, Any] = {"upload_rate": "1024GiB/s"} if rate else {}
    data = config_for([primary.address], mirror="shadow", **extra)
    data["pools"]["shadow"] = {"servers": [shadow.address], "health": {"check": "none"}}
    payload = os.urandom(50000)
    async with running_balancer(data) as (balancer, address):
        sock = early_client(address, payload, fin=True)
        assert await read_to_eof(sock) == payload
        await wait_until(lambda: bool(copies))
        await settle(balancer, 1)
    assert copies == [payload]
    assert RECORDS == [("client_eof", 50000, 50000)], RECORDS


@pytest.mark.parametrize("io", ["epoll", "portable"])
async def test_workers_two_with_early_bytes(nursery: trio.Nursery, tmp_path: Any, io: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import all_serving, supervisor, write_config

    monkeypatch.setenv("ANUBIS_IO", io)
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "a.toml"
    write_config(config, port, admin_port, [backend.address], workers=2)
    async with supervisor(config):
        await all_serving(admin_port, 2)

        async def one(i: int) -> None:
            payload = os.urandom(1000 + i * 97)
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert await read_to_eof(sock) == payload

        async with trio.open_nursery() as n:
            for i in range(60):
                n.start_soon(one, i)


async def test_mixed_stress(nursery: trio.Nursery) -> None:
    """Concurrent clients of every shape; everything ends, counts return to 0, no fd leak."""
    import random

    rng = random.Random(7)
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address])
    ok: list[str] = []
    with no_fd_leak():
        async with running_balancer(data) as (balancer, address):
            async def one(i: int) -> None:
                kind = rng.choice(["fin", "later", "rst", "bare_fin", "big"])
                payload = os.urandom(rng.choice([1, 10, 4000, 16384, 16385, 70000]))
                stream = await trio.open_tcp_stream(address.host, address.port)
                if kind == "rst":
                    await stream.send_all(payload)
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await stream.aclose()
                    ok.append(kind)
                    return
                async with stream:
                    if kind == "bare_fin":
                        await stream.send_eof()
                        assert await receive_all(stream) == b""
                    elif kind == "later":
                        await stream.send_all(payload[:1])
                        await trio.sleep(0.01)
                        await stream.send_all(payload[1:])
                        await stream.send_eof()
                        assert await receive_all(stream) == payload
                    else:
                        if kind == "big":
                            payload = os.urandom(300000)
                        async with trio.open_nursery() as n:
                            async def send() -> None:
                                await stream.send_all(payload)
                                await stream.send_eof()
                            n.start_soon(send)
                            got = await receive_all(stream)
                        assert got == payload
                ok.append(kind)

            with trio.fail_after(90):
                async with trio.open_nursery() as n:
                    for i in range(400):
                        n.start_soon(one, i)
                        if i % 50 == 0:
                            await trio.sleep(0.01)
            assert len(ok) == 400
            await wait_until(lambda: balancer.limits.active == 0)
            await wait_until(lambda: balancer.pools["test"].servers[0].active == 0)
