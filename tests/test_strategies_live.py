"""Strategies over real sockets: the live view the relay updates drives the picks."""

from __future__ import annotations

import math
import socket
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    closed_without_answer,
    config_for,
    connect,
    free_port,
    name_handler,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.config import Address
from trioanubis.pool import Pool
from trioanubis.strategies.source_hash import SourceHash
from trioanubis.summary import describe


def late_handler(name: str, delay: float):  # type: ignore[no-untyped-def]
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while await stream.receive_some(65536):
                    pass
                await trio.sleep(delay)  # the behaviour under test: a slow server
                await stream.send_all(name.encode())
            except trio.BrokenResourceError:
                pass

    return handler


@pytest.mark.slow
async def test_least_time_prefers_the_fast_server(nursery: trio.Nursery) -> None:
    fast = await start_backend(nursery, late_handler("fast", 0.0))
    slow = await start_backend(nursery, late_handler("slow", 0.1))
    data = config_for([slow.address, fast.address], strategy="least_time")
    async with running_balancer(data) as (balancer, address):
        for _ in range(4):  # warm-up: every server gets measured
            await request(address)
        answers = Counter([await request(address) for _ in range(50)])
        assert answers[b"fast"] >= 40, answers
        pool = balancer.pools["test"]
        slow_record, fast_record = pool.servers
        assert slow_record.ewma is not None and fast_record.ewma is not None
        assert slow_record.ewma > fast_record.ewma
        assert "ewma" in describe(balancer.config, balancer.pools)


@pytest.mark.slow
async def test_least_time_connect_mode_records_connect_times(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("x"))
    data = config_for([backend.address], strategy="least_time", least_time="connect")
    async with running_balancer(data) as (balancer, address):
        assert await request(address) == b"x"
        assert balancer.pools["test"].servers[0].ewma is not None


async def test_least_connections_sends_new_connections_to_the_less_busy(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    data = config_for([one.address, two.address], strategy="least_connections")
    async with running_balancer(data) as (balancer, address):
        held = [await connect(address) for _ in range(3)]  # long-lived: 2 on one server, 1 on the other
        await wait_until(lambda: one.active + two.active == 3)
        busier = b"one" if one.active > two.active else b"two"
        quieter = b"two" if busier == b"one" else b"one"
        assert [await request(address) for _ in range(5)] == [quieter] * 5
        for stream in held:
            await stream.aclose()
        await wait_until(lambda: balancer.pools["test"].active == 0)


async def test_source_hash_sticks_one_client_to_one_server(nursery: trio.Nursery) -> None:
    backends = [await start_backend(nursery, name_handler(f"s{i}")) for i in range(4)]
    data = config_for([b.address for b in backends], strategy="source_hash")
    async with running_balancer(data) as (_, address):
        answers = {await request(address) for _ in range(20)}
    assert len(answers) == 1


async def test_custom_strategy_by_dotted_path(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent("""
        class LastUsable:
            def pick(self, servers, client_key, usable):
                return next((s for s in reversed(servers) if usable(s)), None)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        backends = [await start_backend(nursery, name_handler(f"s{i}")) for i in range(3)]
        data = config_for([b.address for b in backends], strategy="my_strategies:LastUsable")
        async with running_balancer(data) as (_, address):
            assert {await request(address) for _ in range(5)} == {b"s2"}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_strategies", None)


async def test_a_custom_strategy_may_extend_round_robin(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Round robin is compiled in the compiled build (setup.py): a strategy of the user's may still
    extend it."""
    (tmp_path / "my_round_robin.py").write_text(textwrap.dedent("""
        from trioanubis.strategies.round_robin import RoundRobin

        class SkipFirst(RoundRobin):
            def pick(self, servers, client_key, usable):
                return super().pick(servers[1:], client_key, usable)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        backends = [await start_backend(nursery, name_handler(f"s{i}")) for i in range(3)]
        data = config_for([b.address for b in backends], strategy="my_round_robin:SkipFirst")
        async with running_balancer(data) as (_, address):
            assert {await request(address) for _ in range(6)} == {b"s1", b"s2"}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_round_robin", None)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["round_robin", "least_connections", "random", "power_of_two",
                                      "source_hash", "least_time"])  # fmt: skip
async def test_full_servers_are_skipped_and_all_full_closes_at_once(
    nursery: trio.Nursery, strategy: str
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    servers = [{"address": one.address, "max_connections": 1},
               {"address": two.address, "max_connections": 2}]  # fmt: skip
    async with running_balancer(config_for(servers, strategy=strategy)) as (balancer, address):
        pool = balancer.pools["test"]
        held = [await connect(address) for _ in range(3)]
        await wait_until(lambda: one.active == 1 and two.active == 2)
        with trio.fail_after(20):
            assert await closed_without_answer(address)
        assert pool.all_full == 1 and pool.no_server == 1
        await held.pop().aclose()
        await wait_until(lambda: one.active + two.active == 2)
        answer = await request(address)
        assert answer in (b"one", b"two")
        for stream in held:
            await stream.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["round_robin", "least_connections"])
async def test_max_connections_is_a_hard_cap_under_a_burst(nursery: trio.Nursery, strategy: str) -> None:
    """30 clients queued in the backlog at once: their connects are all in flight together.

    Each backend holds every connection it accepts, so the most it ever held is the number it
    accepted; the balancer must never have sent it more than its `max_connections`.
    """
    held = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await held.wait()

    backends = [await start_backend(nursery, hold, f"b{i}") for i in range(2)]
    servers = [{"address": b.address, "max_connections": 5} for b in backends]
    async with running_balancer(config_for(servers, strategy=strategy)) as (balancer, address):
        pool = balancer.pools["test"]
        clients = []
        for _ in range(30):  # no checkpoint in between: all 30 wait in the listen backlog
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex((address.host, address.port))
            clients.append(client)
        try:
            relayed = lambda: sum(s.total for s in pool.servers)  # noqa: E731
            await wait_until(lambda: relayed() + pool.no_server == 30)
            await wait_until(lambda: sum(b.connections for b in backends) == relayed())
            assert [b.connections for b in backends] == [5, 5]
            assert [s.active for s in pool.servers] == [5, 5]
            assert pool.all_full == 20
        finally:
            for client in clients:
                client.close()
            held.set()
        await wait_until(lambda: pool.active == 0)


async def test_a_failed_connect_gives_its_reserved_slot_back(nursery: trio.Nursery) -> None:
    live = await start_backend(nursery, name_handler("live"))
    servers = [{"address": f"127.0.0.1:{free_port()}", "name": "dead", "max_connections": 1},
               {"address": live.address, "name": "live", "max_connections": 1}]  # fmt: skip
    data = config_for(servers, eject_after=0, retries=1)
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        dead = pool.find("dead")
        assert dead is not None
        for _ in range(4):  # round robin tries the dead one in turn, then fails over
            assert await request(address) == b"live"
        assert dead.connect_failures >= 1
        await wait_until(lambda: pool.active == 0)  # no slot kept by a failed connect
        assert pool.all_full == 0


def hello_handler(name: str):  # type: ignore[no-untyped-def]
    """A backend that says its name at once and holds the connection until the client's EOF."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.send_all(name.encode())
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass

    return handler


async def open_from(source: str, address: Address) -> tuple[trio.SocketStream, bytes]:
    """A connection whose client address is `source` (any 127.0.0.x is this host); the server's name."""
    stream = await trio.open_tcp_stream(address.host, address.port, local_address=source)
    return stream, await stream.receive_some(100)


def sources_of_one_server(pool: Pool, count: int) -> tuple[str, list[str]]:
    """`count` loopback client addresses that source_hash sends to one server, and its name."""
    candidates = pool.candidates()
    by_owner: dict[str, list[str]] = {}
    for last in range(2, 255):
        source = f"127.0.0.{last}"
        owner = SourceHash().pick(candidates, socket.inet_aton(source), lambda s: True)
        assert owner is not None
        by_owner.setdefault(owner.name, []).append(source)
    name, sources = max(by_owner.items(), key=lambda item: len(item[1]))
    return name, sources[:count]


@pytest.mark.slow
async def test_bounded_source_hash_spreads_a_burst_and_takes_it_back(nursery: trio.Nursery) -> None:
    """Three clients that hash to one server: their burst spreads once that server passes its bound
    (balance_factor 1.25: ceil(1.25 × (A + 1) / 3)); once the load falls, they are back on it."""
    backends = [await start_backend(nursery, hello_handler(f"s{i}"), f"s{i}") for i in range(3)]
    servers = [{"address": b.address, "name": f"s{i}"} for i, b in enumerate(backends)]
    data = config_for(servers, strategy="source_hash", balance_factor=1.25)
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        own, sources = sources_of_one_server(pool, 3)
        held = []
        try:
            for turn in range(12):
                stream, name = await open_from(sources[turn % 3], address)
                held.append(stream)
                mine = pool.find(own)
                assert mine is not None and mine.active <= math.ceil(1.25 * (turn + 1) / 3), name
            answers = Counter(s.name for s in pool.servers for _ in range(s.active))
            assert answers[own] == 5 and len(answers) == 3, answers  # ceil(1.25 × 12 / 3) = 5
        finally:
            for stream in held:
                await stream.aclose()
        await wait_until(lambda: pool.active == 0)
        for source in sources:
            stream, name = await open_from(source, address)
            async with stream:
                assert name == own.encode()
        assert "balance_factor 1.25" in describe(balancer.config, balancer.pools)
