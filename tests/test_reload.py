"""Reload (reload.py): what a new config changes, decided from the running config (pure), and the
servers of a kept pool brought to the file's list; carried out on a running balancer here and in
tests/test_operations.py and tests/test_control.py."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import config_for, name_handler, request, running_balancer, start_backend
from trioanubis.config import Address, listen_ip, parse_config
from trioanubis.pool import Pool, Server, diff_servers
from trioanubis.reload import ADMIN_WARNING, IO_WARNING, plan, update_servers

BASE = {
    "listeners": {
        "web": {"bind": "127.0.0.1:8000", "pool": "a"},
        "old": {"bind": "127.0.0.1:8001", "pool": "a"},
    },
    "pools": {"a": {"servers": ["127.0.0.1:9000"]}, "gone": {"servers": ["127.0.0.1:9001"]}},
}


def test_plan_sorts_pools_and_listeners_by_what_happens_to_them() -> None:
    running = parse_config(BASE, "a.toml")
    new = parse_config({
        "listeners": {
            "web": {"bind": "127.0.0.1:8000", "pool": "b"},
            "moved": {"bind": "127.0.0.1:8002", "pool": "a"},
        },
        "pools": {"a": {"servers": ["127.0.0.1:9000"]}, "b": {"servers": ["127.0.0.1:9002"]}},
        "admin": {"bind": "127.0.0.1:8100"},
    }, "b.toml")  # fmt: skip
    changes = plan(running, running.pools, {n: c for n, c in running.listeners.items()}, new, io_forced=False)
    assert (changes.pools_added, changes.pools_kept, changes.pools_removed) == (("b",), ("a",), ("gone",))
    assert changes.listeners_reconfigured == ("web",)
    assert changes.listeners_bound == ("moved",)
    assert changes.listeners_removed == ("old",)
    assert changes.warnings == (ADMIN_WARNING,)


def test_plan_compares_with_the_bind_that_runs_not_the_last_file() -> None:
    """A rebind that failed left the listener on its old address: the next reload tries again."""
    running = parse_config(BASE, "a.toml")
    still = {"web": parse_config(BASE, "a.toml").listeners["web"]}
    wanted = dict(BASE, listeners={"web": {"bind": "127.0.0.1:8005", "pool": "a"}})
    new = parse_config(wanted, "b.toml")
    after_failed_rebind = parse_config(wanted, "b.toml")  # what self.config became
    assert plan(after_failed_rebind, running.pools, still, new, io_forced=False).listeners_bound == ("web",)


@pytest.mark.slow
def test_plan_keeps_a_listener_whose_bind_is_only_written_differently() -> None:
    """":8000" and "0.0.0.0:8000" are one socket: rebinding it would fail with "address in use"."""
    running = parse_config(dict(BASE, listeners={"web": {"bind": ":8000", "pool": "a"}}), "a.toml")
    for same in ("0.0.0.0:8000", ":8000"):
        new = parse_config(dict(BASE, listeners={"web": {"bind": same, "pool": "a"}}), "b.toml")
        changes = plan(running, running.pools, running.listeners, new, io_forced=False)
        assert changes.listeners_reconfigured == ("web",)
    local = parse_config(dict(BASE, listeners={"web": {"bind": "localhost:8000", "pool": "a"}}), "l.toml")
    loopback = listen_ip("localhost")
    assert loopback is not None
    host = f"[{loopback}]" if loopback.version == 6 else str(loopback)
    same = parse_config(dict(BASE, listeners={"web": {"bind": f"{host}:8000", "pool": "a"}}), "s.toml")
    assert plan(local, local.pools, local.listeners, same, io_forced=False).listeners_reconfigured == ("web",)
    moved = parse_config(dict(BASE, listeners={"web": {"bind": "127.0.0.1:8000", "pool": "a"}}), "c.toml")
    assert plan(running, running.pools, running.listeners, moved, io_forced=False).listeners_bound == ("web",)


@pytest.mark.slow
def test_plan_warns_about_io_only_when_not_forced() -> None:
    running = parse_config(BASE, "a.toml")
    new = parse_config(dict(BASE, settings={"io": "portable"}), "b.toml")
    assert plan(running, running.pools, running.listeners, new, io_forced=False).warnings == (IO_WARNING,)
    assert plan(running, running.pools, running.listeners, new, io_forced=True).warnings == ()


# ------------------------------------------------------------ the server diff


def test_diff_servers_splits_into_removed_kept_and_added() -> None:
    pool = Pool(parse_config(BASE, "a.toml").pools["a"])
    [server] = pool.servers
    removed, kept, added = diff_servers({"x": server}, {"y": 1})
    assert (removed, kept, added) == ([server], [], [1])
    assert diff_servers({"x": server}, {"x": 2}) == ([], [(server, 2)], [])


def test_update_servers_keeps_removes_and_returns_the_new_ones() -> None:
    pool = Pool(parse_config(BASE, "a.toml").pools["a"])
    [kept] = pool.servers
    new = parse_config(dict(BASE, pools={
        "a": {"servers": [{"address": "127.0.0.1:9000", "weight": 5}, "127.0.0.1:9003"]},
        "gone": {"servers": ["127.0.0.1:9001"]},
    }), "b.toml").pools["a"]  # fmt: skip
    added = update_servers(pool, new)
    assert [s.address for s in added] == [Address("127.0.0.1", 9003)]
    assert pool.servers == [kept] and kept.weight == 5
    pools = {"a": {"servers": ["127.0.0.1:9004"]}, "gone": {"servers": ["127.0.0.1:9001"]}}
    gone = parse_config(dict(BASE, pools=pools), "c.toml").pools["a"]
    assert [s.address.port for s in update_servers(pool, gone)] == [9004]
    assert kept not in pool.servers


@pytest.mark.slow
def test_a_weight_set_through_the_admin_survives_a_reload_of_an_unchanged_file() -> None:
    """As a drain and the admin's faults do; a weight the file changes wins (HAProxy's server-state idea)."""
    config = parse_config(BASE, "a.toml").pools["a"]
    pool = Pool(config)
    [server] = pool.servers
    pool.set_weight(server, 5)  # POST /pools/a/servers/…/weight
    assert update_servers(pool, config) == []
    assert server.weight == 5
    pools = {"a": {"servers": [{"address": "127.0.0.1:9000", "weight": 3}]}, "gone": BASE["pools"]["gone"]}
    changed = parse_config(dict(BASE, pools=pools), "b.toml").pools["a"]
    update_servers(pool, changed)
    assert server.weight == 3


@pytest.mark.slow
async def test_a_reload_that_replaces_the_only_server_never_leaves_the_pool_empty(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new server is resolved (a wait: DNS) before the pool changes; a connection arriving
    meanwhile found no server and was refused (seen under load with two workers)."""
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    async with running_balancer(config_for([one.address])) as (balancer, address):
        during: list[list[str]] = []
        resolve = balancer.resolve

        async def slow_resolve(servers: list[Server], pool: Any) -> None:
            during.append([server.name for server in pool.servers])
            await trio.testing.wait_all_tasks_blocked()  # any connection task runs here
            await resolve(servers, pool)

        monkeypatch.setattr(balancer, "resolve", slow_resolve)
        await balancer.apply_config(parse_config(config_for([two.address]), "b.toml"))
        assert during == [[one.address]]
        assert await request(address) == b"two"
