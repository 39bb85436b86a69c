"""Holding clients while no server is up (hold.py), against a real `anubis hello` stopped and restarted."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect,
    connect_when_listening,
    free_port,
    receive_all,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.config import parse_config
from trioanubis.errors import ConfigError
from trioanubis.ops.metrics import pool_stats, prometheus

HELLO_REQUEST = b"GET /first-bytes HTTP/1.0\r\nHost: x\r\n\r\n"


@asynccontextmanager
async def hello_process(port: int, name: str = "web") -> AsyncIterator[trio.Process]:
    """A real `anubis hello` on `port`, listening when yielded; SIGTERMed at the end."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioanubis", "hello", "--name", name, "--port", str(port),
         "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        stream = await connect_when_listening(port)
        await stream.aclose()
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()


def held_config(port: int, **pool: Any) -> dict[str, Any]:
    health = {"check": "tcp", "interval": "2s", "timeout": "500ms", "rise": 2, "fall": 2}
    return config_for([f"127.0.0.1:{port}"], health=health, queue_timeout="20s", **pool)


@pytest.mark.slow
async def test_a_client_arriving_while_the_server_restarts_is_served_when_it_is_back() -> None:
    port = free_port()
    # A half-closed client waiting for its answer is kept in line when abort_on_close is off.
    async with running_balancer(held_config(port, abort_on_close=False)) as (balancer, address):
        pool = balancer.pools["test"]
        async with hello_process(port, "first"):
            assert b"hello from first" in await _get(address)  # held until the first check passes
        # The one server is stopped: the next client is held, its request unread in the kernel.
        client = await connect(address)
        await client.send_all(HELLO_REQUEST)
        await client.send_eof()
        await wait_until(lambda: len(pool.held) == 1)
        async with hello_process(port, "second"):
            answer = await receive_all(client)
            await client.aclose()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b"hello from second\n")
        assert pool.held.served >= 1 and len(pool.held) == 0
        assert balancer.access.counts.get("no_server", 0) == 0
        assert balancer.access.counts.get("connect_failed", 0) == 0


async def _get(address: Any) -> bytes:
    stream = await connect(address)
    async with stream:
        await stream.send_all(HELLO_REQUEST)
        return await receive_all(stream)


async def test_held_clients_connect_in_arrival_order_with_their_bytes_intact(nursery: trio.Nursery) -> None:
    port = free_port()
    # Each half-closes while the others may still be held: abort_on_close off keeps them in line.
    async with running_balancer(held_config(port, abort_on_close=False)) as (balancer, address):
        pool = balancer.pools["test"]
        clients = []
        for i in range(5):
            client = await connect(address)
            await client.send_all(b"client %d " % i * 1000)
            clients.append(client)
            await wait_until(lambda: len(pool.held) == len(clients))
        order: list[int] = []

        async def first_byte_order(stream: trio.SocketStream) -> None:
            data = b""
            while len(data) < 12:
                data += await stream.receive_some(12 - len(data))
            order.append(int(data.split()[1]))
            while more := await stream.receive_some(65536):
                data += more
                if len(data) >= len(b"client 0 ") * 1000:
                    break
            await stream.send_all(data)
            await stream.aclose()

        await start_backend(nursery, first_byte_order, port=port)
        for i, client in enumerate(clients):
            await client.send_eof()
            assert await receive_all(client) == b"client %d " % i * 1000
            await client.aclose()
        assert order == [0, 1, 2, 3, 4]


@pytest.mark.slow
async def test_queue_bound_and_timeout_are_enforced_and_counted() -> None:
    port = free_port()  # nothing listens there: no server ever comes up
    data = held_config(port, max_queued=2)
    data["pools"]["test"]["queue_timeout"] = "1s"
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        held = [await connect(address) for _ in range(2)]
        await wait_until(lambda: len(pool.held) == 2)
        assert pool_stats(pool)["queued"] == 2
        third = await connect(address)
        assert await receive_all(third) == b""  # closed at once: the line is full
        assert pool.held.full == 1 and balancer.access.counts["queue_full"] == 1
        await third.aclose()
        for stream in held:
            assert await receive_all(stream) == b""  # closed after queue_timeout
            await stream.aclose()
        await wait_until(lambda: balancer.access.counts.get("queue_timeout") == 2)
        metrics = prometheus(balancer)
        assert 'anubis_pool_queue_timeouts_total{pool="test"} 2' in metrics
        assert 'anubis_pool_queue_full_total{pool="test"} 1' in metrics
        assert 'anubis_pool_queued_clients{pool="test"} 0' in metrics
        assert 'anubis_connections_ended_total{end="queue_timeout"} 2' in metrics
        assert pool.no_server == 0


async def test_a_held_client_that_leaves_frees_its_place() -> None:
    port = free_port()
    async with running_balancer(held_config(port)) as (balancer, address):
        pool = balancer.pools["test"]
        client = await connect(address)
        await wait_until(lambda: len(pool.held) == 1)
        await client.aclose()
        await wait_until(lambda: len(pool.held) == 0)
        assert balancer.access.counts["client_abort"] == 1


async def test_without_queue_timeout_a_client_is_closed_at_once_as_before() -> None:
    port = free_port()
    data = held_config(port)
    del data["pools"]["test"]["queue_timeout"]
    async with running_balancer(data) as (balancer, address):
        client = await connect(address)
        async with client:
            assert await receive_all(client) == b""
        assert balancer.pools["test"].no_server == 1 and balancer.pools["test"].held.held == 0


@given(timeout=st.one_of(st.text(max_size=8), st.integers(-5, 10**12), st.floats(), st.booleans()),
       bound=st.one_of(st.integers(-5, 10**7), st.text(max_size=4), st.none()))  # fmt: skip
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_queue_keys_are_accepted_or_named_in_the_error(timeout: object, bound: object) -> None:
    pool: dict[str, Any] = {"queue_timeout": timeout}
    if bound is not None:
        pool["max_queued"] = bound
    try:
        config = parse_config(config_for(["127.0.0.1:1"], **pool), "t.toml")
    except ConfigError as exc:
        assert "pools.test.queue_timeout" in str(exc) or "pools.test.max_queued" in str(exc)
        return
    assert config.pools["test"].queue_timeout >= 0
    assert config.pools["test"].max_queued >= 1


@pytest.mark.parametrize("timeout", ["50ms", "1s"])
async def test_accepted_queue_configs_run_and_serve(nursery: trio.Nursery, timeout: str) -> None:
    backend = await start_backend(nursery)
    data = config_for([backend.address], queue_timeout=timeout, max_queued=1)
    async with running_balancer(data) as (_, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await receive_all(stream) == b"ping"


@pytest.mark.slow
async def test_anubis_proxy_holds_a_client_until_its_one_server_starts() -> None:
    port, backend_port = free_port(), free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioanubis", "proxy", f"127.0.0.1:{port}", f"127.0.0.1:{backend_port}",
         "--queue-timeout", "30s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = await connect_when_listening(port)
        await client.send_all(HELLO_REQUEST)
        async with hello_process(backend_port, "late"):
            answer = await receive_all(client)
            await client.aclose()
        assert answer.endswith(b"hello from late\n")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()
    assert process.returncode == 0


@given(timeout=st.one_of(st.integers(0, 100), st.sampled_from(["0s", "5ms", "1s", "1h", "2m30s"])),
       bound=st.integers(1, 10**6))  # fmt: skip
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_queue_keys_reload_into_a_running_balancer_that_keeps_serving(
    timeout: object, bound: int
) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery)
            async with running_balancer(config_for([backend.address])) as (balancer, address):
                new = config_for([backend.address], queue_timeout=timeout, max_queued=bound)
                await balancer.apply_config(parse_config(new, "t.toml"))
                stream = await connect(address)
                async with stream:
                    await stream.send_all(b"ping")
                    await stream.send_eof()
                    assert await receive_all(stream) == b"ping"
            nursery.cancel_scope.cancel()

    trio.run(main)
