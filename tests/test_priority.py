"""Priority groups and backup servers: the pool's grouping, and failover between real backends."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    config_for,
    connect,
    connect_when_listening,
    free_port,
    name_handler,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import admin_config, http
from trioanubis.config import Address, parse_config, parse_config_text
from trioanubis.discovery import Found, apply
from trioanubis.pool import Pool, Server
from trioanubis.strategies import STRATEGIES
from trioanubis.summary import describe

FAST_HTTP = {"check": "http", "path": "/health", "expect_body": "up", "interval": "100ms", "timeout": "2s",
             "rise": 2, "fall": 2}  # fmt: skip
FAST_TCP = {"check": "tcp", "interval": "50ms", "timeout": "2s", "rise": 2, "fall": 2}


def make_pool(servers: list[dict[str, Any]], strategy: str = "round_robin") -> Pool:
    data = config_for(servers, strategy=strategy, health={"check": "none"})
    return Pool(parse_config(data).pools["test"])


def named(pool: Pool) -> dict[str, Server]:
    return {s.name: s for s in pool.servers}


def picks(pool: Pool, count: int, exclude: list[Server] | None = None) -> Counter[str]:
    chosen = [pool.pick(bytes([i % 250, 1, 2, 3]), exclude or ()) for i in range(count)]
    return Counter(s.name if s else "" for s in chosen)


SERVERS = [
    {"address": "127.0.0.1:1", "name": "a"},
    {"address": "127.0.0.1:2", "name": "b"},
    {"address": "127.0.0.1:3", "name": "backup", "backup": True},
    {"address": "127.0.0.1:4", "name": "last", "priority": 5},
]


# ------------------------------------------------------------------ the pool, without I/O


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_picks_only_from_the_serving_group(strategy: str) -> None:
    pool = make_pool(SERVERS, strategy)
    servers = named(pool)
    assert pool.serving_priority == 0 and [s.name for s in pool.candidates()] == ["a", "b"]
    assert set(picks(pool, 50)) == {"a", "b"}
    pool.mark_down(servers["a"], "test")
    pool.set_draining(servers["b"], True)
    assert pool.serving_priority == 1 and set(picks(pool, 20)) == {"backup"}
    pool.mark_down(servers["backup"], "test")
    assert pool.serving_priority == 5 and set(picks(pool, 20)) == {"last"}
    pool.mark_down(servers["last"], "test")
    assert pool.serving_priority is None and pool.candidates() == () and set(picks(pool, 3)) == {""}
    pool.mark_up(servers["backup"])
    assert set(picks(pool, 20)) == {"backup"}
    pool.set_draining(servers["b"], False)  # a better group recovers: new connections go back
    assert pool.serving_priority == 0 and set(picks(pool, 20)) == {"b"}


def test_a_full_or_tried_group_overflows_to_the_next() -> None:
    servers = [{**s, "max_connections": 1} for s in SERVERS[:3]]
    pool = make_pool(servers)
    a, b, backup = pool.servers
    pool.reserve(a)
    pool.reserve(b)
    assert pool.pick(b"k") is backup
    assert pool.serving_priority == 0  # full is not down: the group still serves
    pool.release(a, 0, 0)
    assert pool.pick(b"k") is a
    pool.release(b, 0, 0)
    assert set(picks(pool, 10, exclude=[a, b])) == {"backup"}  # failover tried the whole group


def test_the_pick_path_reuses_the_grouped_tuple() -> None:
    pool = make_pool(SERVERS)
    first = pool.candidates()
    picks(pool, 10)
    assert pool.candidates() is first  # grouping happens on changes, not per pick
    pool.mark_down(pool.servers[0], "test")
    assert pool.candidates() is not first and [s.name for s in pool.candidates()] == ["b"]


def test_each_group_keeps_its_own_rotation() -> None:
    pool = make_pool([*SERVERS[:2], {"address": "127.0.0.1:5", "name": "c", "backup": True},
                      {"address": "127.0.0.1:6", "name": "d", "backup": True}])  # fmt: skip
    a, b, c, _ = pool.servers
    pool.reserve(a)
    pool.reserve(b)
    a.max_connections = b.max_connections = 1
    pool.changed()
    assert [pool.pick(b"").name for _ in range(4)] == ["c", "d", "c", "d"]  # type: ignore[union-attr]
    pool.release(a, 0, 0)
    assert pool.pick(b"") is a
    pool.release(b, 0, 0)
    assert [pool.pick(b"").name for _ in range(4)] == ["b", "a", "b", "a"]  # type: ignore[union-attr]
    assert pool.pick(b"", [a, b]) is c


def test_slow_start_brings_traffic_back_gradually() -> None:
    pool = make_pool(SERVERS[:3])
    a, b, _ = pool.servers
    pool.mark_down(a, "test")
    pool.mark_down(b, "test")
    assert set(picks(pool, 10)) == {"backup"}
    pool.mark_up(a)
    pool.set_effective_weight(a, 1 / 16)  # what the checker's ramp does first
    first = picks(pool, 160)
    assert first == {"a": 10, "backup": 150}
    pool.set_effective_weight(a, 0.5)
    assert picks(pool, 160) == {"a": 80, "backup": 80}
    pool.set_effective_weight(a, 1.0)
    assert picks(pool, 20) == {"a": 20}
    pool.mark_up(b)
    pool.set_effective_weight(b, 1 / 16)  # a already serves at full weight: no spill to backup
    assert set(picks(pool, 40)) == {"a", "b"}


def test_serving_group_changes_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("trioanubis").propagate = True
    caplog.set_level(logging.INFO, "trioanubis.pool")
    pool = make_pool(SERVERS[:3])
    a, b, _ = pool.servers
    pool.mark_down(a, "test")
    pool.mark_down(b, "test")
    pool.set_weight(pool.servers[2], 3)
    pool.mark_up(a)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if "serves" in r.getMessage()]
    assert messages == [  # falling back is a warning; the best group serving again is normal
        ("WARNING", "pool test: priority 1 serves new connections (no server of priority 0 is usable)"),
        ("INFO", "pool test: priority 0 serves new connections again"),
    ]


def test_check_summary_names_priorities() -> None:
    config = parse_config(config_for(SERVERS, health={"check": "none"}))
    summary = describe(config)
    assert "server backup: 127.0.0.1:3 weight 1 priority 1 (backup)" in summary
    assert "server last: 127.0.0.1:4 weight 1 priority 5" in summary


# ------------------------------------------------------------------ real backends


@asynccontextmanager
async def hello(name: str, port: int) -> AsyncIterator[trio.Process]:
    """`anubis hello` in a subprocess on 127.0.0.1:`port`, terminated at the end."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioanubis", "hello", "--name", name, "--port", str(port),
         "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        (await connect_when_listening(port)).socket.close()
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()


async def who_answers(address: Any) -> str:
    answer = await request(address, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    return answer.rsplit(b"hello from ", 1)[-1].strip().decode() if b"hello from" in answer else ""


@pytest.mark.slow
async def test_backup_takes_over_and_hands_back(nursery: trio.Nursery) -> None:
    primary_port, backup_port = free_port(), free_port()
    servers = [{"address": f"127.0.0.1:{primary_port}", "name": "primary"},
               {"address": f"127.0.0.1:{backup_port}", "name": "backup", "backup": True}]  # fmt: skip
    data = admin_config(servers, health=FAST_HTTP)
    async with (
        hello("backup", backup_port),
        hello("primary", primary_port) as first,
        running_balancer(data) as (balancer, address),
    ):
        pool = balancer.pools["test"]
        primary = pool.servers[0]
        assert [await who_answers(address) for _ in range(10)] == ["primary"] * 10
        await check_admin_views(balancer, serving=0)

        first.send_signal(signal.SIGTERM)
        await first.wait()
        await wait_until(lambda: pool.serving_priority == 1)  # one interval plus fall
        assert [await who_answers(address) for _ in range(10)] == ["backup"] * 10
        await check_admin_views(balancer, serving=1)

        async with hello("primary", primary_port):
            await wait_until(lambda: primary.healthy)  # after rise
            assert [await who_answers(address) for _ in range(10)] == ["primary"] * 10


async def check_admin_views(balancer: Any, serving: int) -> None:
    status, _, body = await http(balancer.admin_address, "GET", "/stats")
    assert status == 200
    document = json.loads(body)["pools"][0]
    assert document["serving_priority"] == serving
    assert [(s["name"], s["priority"]) for s in document["servers"]] == [("primary", 0), ("backup", 1)]
    status, _, body = await http(balancer.admin_address, "GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert [s.value for s in families["anubis_pool_serving_priority"].samples] == [serving]
    priorities = {s.labels["server"]: s.value for s in families["anubis_server_priority"].samples}
    assert priorities == {"primary": 0, "backup": 1}


@pytest.mark.slow
async def test_two_priority_levels_and_a_backup_with_least_connections(nursery: trio.Nursery) -> None:
    ports = {name: free_port() for name in ("a1", "a2", "backup", "last")}
    backends = {name: await start_backend(nursery, name_handler(name), port=port)
                for name, port in ports.items()}  # fmt: skip
    servers = [{"address": f"127.0.0.1:{ports['a1']}", "name": "a1"},
               {"address": f"127.0.0.1:{ports['a2']}", "name": "a2"},
               {"address": f"127.0.0.1:{ports['backup']}", "name": "backup", "backup": True},
               {"address": f"127.0.0.1:{ports['last']}", "name": "last", "priority": 2}]  # fmt: skip
    data = config_for(servers, strategy="least_connections", health=FAST_TCP)
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        a1 = pool.servers[0]
        held = await connect(address)  # one open connection on a1 or a2 ...
        await wait_until(lambda: pool.active == 1)
        busy = next(s for s in pool.servers if s.active)
        assert busy.name in ("a1", "a2")
        other = "a2" if busy.name == "a1" else "a1"
        # ... so the other is the less busy one
        assert [await request(address) for _ in range(5)] == [other.encode()] * 5
        await held.aclose()

        for name in ("a1", "a2"):
            backends[name].stop()
        await wait_until(lambda: pool.serving_priority == 1)
        assert {await request(address) for _ in range(5)} == {b"backup"}
        backends["backup"].stop()
        await wait_until(lambda: pool.serving_priority == 2)
        assert {await request(address) for _ in range(5)} == {b"last"}

        backends["a1"] = await start_backend(nursery, name_handler("a1"), port=ports["a1"])
        await wait_until(lambda: a1.healthy)
        assert pool.serving_priority == 0
        assert {await request(address) for _ in range(5)} == {b"a1"}


def test_the_reference_config_documents_backup_servers() -> None:
    text = (Path(__file__).resolve().parent.parent / "anubis.toml").read_text()
    assert '  # { address = "127.0.0.1:9004", name = "spare", backup = true },' in text
    config = parse_config_text(text.replace("  # { address", "  { address"), "anubis.toml")
    assert [s.priority for s in config.pools["web"].servers] == [0, 0, 0, 1]


def test_discovered_servers_join_their_priority_group() -> None:
    data = config_for([{"address": "127.0.0.1:1", "name": "a"},
                       {"dns": "localhost:7000", "backup": True}], health={"check": "none"})  # fmt: skip
    config = parse_config(data).pools["test"]
    pool = Pool(config)
    entry = config.discovery[0]
    assert entry.priority == 1
    apply(pool, entry, {Found(Address("127.0.0.2", 7000), 1)})
    assert [(s.name, s.priority) for s in pool.servers] == [("a", 0), ("127.0.0.2:7000", 1)]
    assert [s.name for s in pool.candidates()] == ["a"]
    apply(pool, replace(entry, priority=0), {Found(Address("127.0.0.2", 7000), 1)})  # reloaded
    assert [s.name for s in pool.candidates()] == ["a", "127.0.0.2:7000"]


def test_groups_ramping_together_keep_their_order() -> None:
    pool = make_pool(SERVERS[:3])
    for server in pool.servers:  # a fresh start with slow start: every server ramps at once
        pool.set_effective_weight(server, 1 / 16)
    assert set(picks(pool, 32)) == {"a", "b"}
    pool.set_effective_weight(pool.servers[2], 0.5)  # the backup is ahead: it keeps the difference
    assert picks(pool, 16)["backup"] == 7


async def test_reload_moves_servers_between_groups(nursery: trio.Nursery) -> None:
    a = await start_backend(nursery, name_handler("a"))
    b = await start_backend(nursery, name_handler("b"))
    servers = [{"address": a.address, "name": "a"}, {"address": b.address, "name": "b", "backup": True}]
    async with running_balancer(config_for(servers)) as (balancer, address):
        assert {await request(address) for _ in range(4)} == {b"a"}
        swapped = [{"address": a.address, "name": "a", "priority": 3}, {"address": b.address, "name": "b"}]
        await balancer.apply_config(parse_config(config_for(swapped, strategy="random"), "reloaded.toml"))
        assert balancer.pools["test"].serving_priority == 0
        assert {await request(address) for _ in range(4)} == {b"b"}
