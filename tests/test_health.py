"""Health checks, passive ejection and failover, with real backends on loopback."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tests.conftest import (
    closed_without_answer,
    config_for,
    count_tasks,
    descriptors_exhausted,
    free_port,
    name_handler,
    no_fd_leak,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import blackholed_port
from trioanubis.config import parse_config
from trioanubis.health.checker import ServerHealth
from trioanubis.health.state import Hysteresis, slow_start_weight
from trioanubis.pool import Pool

FAST_TCP = {"check": "tcp", "interval": "50ms", "timeout": "1s", "rise": 2, "fall": 2}


def http_handler(status: int, body: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(4096)
                if not data:
                    return
                head += data
            reason = b"OK" if status == 200 else b"Service Unavailable"
            await stream.send_all(
                b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (status, reason, len(body), body)
            )

    return handler


async def chunked_up(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(4096)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"1\r\nu\r\n1\r\np\r\n0\r\n\r\n")


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@pytest.mark.slow
async def test_killed_backend_costs_no_request_and_returns_after_restart(nursery: trio.Nursery) -> None:
    backends = [await start_backend(nursery, name_handler(f"s{i}")) for i in range(3)]
    victim = backends[1]
    port = victim.port
    data = config_for([b.address for b in backends], health=FAST_TCP)
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        record = pool.servers[1]
        answers = []
        for i in range(300):
            if i == 50:
                victim.stop()
                # Closed before the next request: a connect the kernel completed to the closing
                # listener would be reset with the request sent (the client reset, as it must be).
                await victim.stopped.wait()
            if i == 150:
                await wait_until(lambda: not record.healthy)
                failures_when_marked_down = record.connect_failures
            if i == 200:
                victim = await start_backend(nursery, name_handler("s1-again"), port=port)
                await wait_until(lambda: record.healthy)
            answers.append(await request(address))
        assert b"" not in answers  # zero failed client requests
        assert record.connect_failures == failures_when_marked_down  # none tried while down
        assert victim.connections > 0 and b"s1-again" in answers[200:]
        assert set(answers[150:200]) == {b"s0", b"s2"}


@pytest.mark.parametrize(
    ("handler", "health", "reason"),
    [
        (http_handler(200, b"down"), {"expect_body": "up"}, "body lacks 'up'"),
        (http_handler(503, b"up"), {}, "status 503"),
        (silent, {"timeout": "200ms"}, "timeout"),
    ],
)
async def test_http_checks_mark_bad_servers_down(
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    health: dict[str, str],
    reason: str,
) -> None:
    good = await start_backend(nursery, http_handler(200, b"all up"))
    bad = await start_backend(nursery, handler)
    health = {"check": "http", "path": "/health", "interval": "50ms", **health}
    async with running_balancer(config_for([good.address, bad.address], health=health)) as (b, _):
        good_record, bad_record = b.pools["test"].servers
        assert good_record.healthy and good_record.last_check == "status 200"
        assert not bad_record.healthy
        assert bad_record.last_check == f"failed: {reason}"


async def test_chunked_health_body_is_understood(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, chunked_up)
    health = {"check": "http", "expect_body": "up", "interval": "1s"}
    async with running_balancer(config_for([backend.address], health=health)) as (balancer, _):
        assert balancer.pools["test"].servers[0].healthy


@pytest.mark.slow
async def test_state_changes_are_logged_once(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("trioanubis").propagate = True
    good = await start_backend(nursery, name_handler("good"))
    dead = free_port()
    async with running_balancer(config_for([good.address, f"127.0.0.1:{dead}"], health=FAST_TCP)) as (
        balancer,
        _,
    ):
        await wait_until(lambda: balancer.pools["test"].servers[0].last_check == "connected")
        checks_seen = good.connections
        await wait_until(lambda: good.connections >= checks_seen + 5)  # several more intervals
    downs = [r for r in caplog.records if f"{dead} is down" in r.getMessage()]
    assert len(downs) == 1
    assert "(refused)" in downs[0].getMessage()


@pytest.mark.slow
async def test_blackholed_server_is_skipped_and_ejected(nursery: trio.Nursery) -> None:
    good = await start_backend(nursery, name_handler("good"))
    with blackholed_port() as port:
        data = config_for(
            [f"127.0.0.1:{port}", good.address], connect_timeout="200ms", eject_after=2,
            health={"check": "none", "interval": "1s"}, eject_for="1h",
        )  # fmt: skip
        async with running_balancer(data) as (balancer, address):
            hole = balancer.pools["test"].servers[0]
            answers = [await request(address) for _ in range(6)]
            assert answers == [b"good"] * 6
            assert not hole.healthy and hole.connect_failures == 2


async def test_failover_never_tries_a_server_twice(nursery: trio.Nursery) -> None:
    good = await start_backend(nursery, name_handler("good"))
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    data = config_for([*dead, good.address], eject_after=0, retries=2)
    async with running_balancer(data) as (balancer, address):
        assert [await request(address) for _ in range(9)] == [b"good"] * 9
        servers = balancer.pools["test"].servers
        # With 3 attempts and 2 dead servers, a repeat would have left a request unanswered;
        # round robin starts every request at a dead server, so each is tried once per request.
        assert [s.connect_failures for s in servers[:2]] == [9, 9]


async def test_failover_timeout_bounds_the_whole_sequence(nursery: trio.Nursery) -> None:
    with blackholed_port() as port:
        data = config_for([f"127.0.0.1:{port}"] * 1, connect_timeout="30s", failover_timeout="200ms")
        async with running_balancer(data) as (balancer, address):
            with trio.fail_after(20):  # far below connect_timeout: the failover bound applied
                assert await closed_without_answer(address)
            assert balancer.access.counts == {"connect_failed": 1}


async def test_all_down_closes_clients_promptly_and_recovers(nursery: trio.Nursery) -> None:
    ports = [free_port() for _ in range(2)]
    data = config_for([f"127.0.0.1:{p}" for p in ports], health=FAST_TCP, connect_timeout="30s")
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        assert not any(s.healthy for s in pool.servers)
        with trio.fail_after(20):  # refused everywhere: closed long before 30 s × 3 attempts
            assert await closed_without_answer(address)
        assert pool.no_server == 1
        back = await start_backend(nursery, name_handler("back"), port=ports[1])
        await wait_until(lambda: pool.servers[1].healthy)
        assert await request(address) == b"back"
        assert back.connections >= 1


async def test_passive_ejection_with_check_none_retries_after_eject_for(nursery: trio.Nursery) -> None:
    port = free_port()
    data = config_for([f"127.0.0.1:{port}"], eject_after=1, eject_for="100ms", retries=0)
    async with running_balancer(data) as (balancer, address):
        server = balancer.pools["test"].servers[0]
        assert await closed_without_answer(address)
        assert not server.healthy
        await start_backend(nursery, name_handler("revived"), port=port)
        await wait_until(lambda: server.healthy)
        assert await request(address) == b"revived"


async def test_stopping_cancels_every_health_task(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("x"))

    before = count_tasks()
    with no_fd_leak():
        async with running_balancer(config_for([backend.address] * 1, health=FAST_TCP)):
            assert count_tasks() > before
            await wait_until(lambda: backend.connections >= 3)
    await wait_until(lambda: backend.active == 0)
    assert count_tasks() == before


def test_hysteresis_rise_and_fall() -> None:
    state = Hysteresis(rise=2, fall=3)
    assert state.observe(False, True) is True  # the first check decides at once
    assert [state.observe(True, False) for _ in range(3)] == [True, True, False]
    assert [state.observe(False, True) for _ in range(2)] == [False, True]
    assert state.observe(True, False) is True  # one failure does not take it down
    assert state.observe(True, True) is True
    assert [state.observe(True, False) for _ in range(3)] == [True, True, False]


def test_slow_start_weight_ramps_in_steps() -> None:
    assert slow_start_weight(16, 0.0, 10.0) == 1
    assert slow_start_weight(16, 5.0, 10.0) == 8
    assert slow_start_weight(16, 10.0, 10.0) == 16
    assert slow_start_weight(3, 1.0, 0.0) == 3


async def test_slow_start_ramps_effective_weight(autojump_clock: trio.testing.MockClock) -> None:
    data = config_for(["127.0.0.1:1"], health={"check": "tcp", "slow_start": "16s"})
    pool = Pool(parse_config(data).pools["test"], initially_healthy=False)
    server = pool.servers[0]
    server.weight = 16
    seen = []
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        ServerHealth(pool, server, nursery).bring_up("passed")
        for at in (0.0, 4.5, 8.5, 12.5, 16.5):  # between steps, never on one
            await trio.sleep_until(start + at)
            seen.append(server.effective_weight)
    assert seen == [1.0, 4.0, 8.0, 12.0, 16.0]


async def test_a_probe_that_runs_out_of_descriptors_does_not_count_against_the_server(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 12.6: a probe's own EMFILE counted as a failed check and marked a healthy server down."""
    logging.getLogger("trioanubis").propagate = True
    backend = await start_backend(nursery, name_handler("up"))
    health = {"check": "tcp", "interval": "20ms", "timeout": "1s", "rise": 1, "fall": 1}
    with caplog.at_level(logging.INFO, logger="trioanubis"):
        async with running_balancer(config_for([backend.address], health=health)) as (b, address):
            server = b.pools["test"].servers[0]
            assert server.healthy
            with descriptors_exhausted():
                await wait_until(lambda: "out of resources" in server.last_check)
                assert server.healthy and server.checks_failed == 0
                skipped = server.checks_skipped
                await wait_until(lambda: server.checks_skipped >= skipped + 3)  # one episode, several probes
            passed = server.checks_passed
            await wait_until(lambda: server.checks_passed > passed)
            assert server.healthy and server.checks_failed == 0
            assert await request(address) == b"up"
    skipped_lines = [r for r in caplog.records if "health check skipped" in r.getMessage()]
    assert len(skipped_lines) == 1 and "not counted against the server" in skipped_lines[0].getMessage()
