"""The fleet task in one process (fleet/fleet.py) against a real etcd: what a hostile tool writes under
the prefix is logged once, counted and ignored, and the balancer serves on; commands from etcd that
are already in effect are skipped; a reload keeps the etcd servers. Its etcd client, used as the fleet's
tasks use it (calls at once, closed from a cancelled nursery), leaves no connection unclosed.

One etcd serves the whole module (a start costs about a second); each test and each fuzz example
uses a prefix of its own."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import echo_handler, request, running_balancer, start_backend, wait_until
from tests.etcdserver import START_TIMEOUT, EtcdServer
from tests.helpers import VALUES, CuttableRelay
from trioanubis.app import Balancer
from trioanubis.cluster import EtcdClient
from trioanubis.config import parse_config
from trioanubis.control import Drain

PREFIXES = itertools.count()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with tempfile.TemporaryDirectory() as directory:
        server = EtcdServer(Path(directory))
        with server.log.open("ab") as log:
            process = subprocess.Popen(server.command(), stdout=log, stderr=log)
        try:
            for _ in range(int(START_TIMEOUT / 0.1)):
                health = subprocess.run(server.ctl_command("endpoint", "health", "--dial-timeout", "1s"),
                                        capture_output=True, check=False)  # fmt: skip
                if health.returncode == 0:
                    break
                assert process.poll() is None, server.log.read_text()
                subprocess.run(["sleep", "0.1"], check=True)
            yield server
        finally:
            process.kill()
            process.wait()


def etcd_client(etcd: EtcdServer) -> EtcdClient:
    return EtcdClient([etcd.endpoint])


def fleet_config(etcd: EtcdServer, prefix: str, backend: str, **pool: Any) -> dict[str, Any]:
    return {"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "web"}},
            "pools": {"web": {"servers_from": "etcd", "servers": [{"address": backend, "name": "file"}],
                              "health": {"check": "none"}, **pool}},
            "cluster": {"etcd": [etcd.endpoint], "prefix": prefix, "name": "t"}}  # fmt: skip


@asynccontextmanager
async def fleet_balancer(etcd: EtcdServer, backend: str) -> AsyncIterator[tuple[Balancer, Any, str]]:
    prefix = f"/t{next(PREFIXES)}/"
    async with running_balancer(fleet_config(etcd, prefix, backend)) as (balancer, address):
        yield balancer, address, prefix


async def settled(client: EtcdClient, balancer: Balancer, prefix: str, backend: str) -> None:
    """Put a good server key last: once the balancer has it, it has seen everything put before."""
    marker = f"m{trio.current_time()}"
    await client.put(f"{prefix}pools/web/servers/{marker}", json.dumps({"address": backend}))
    await wait_until(lambda: balancer.pools["web"].find(marker) is not None)


@pytest.mark.slow
async def test_a_bad_value_is_logged_once_and_counted(etcd: EtcdServer, nursery: trio.Nursery,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    backend = (await start_backend(nursery, echo_handler)).address
    caplog.set_level(logging.WARNING, "trioanubis.fleet")
    async with fleet_balancer(etcd, backend) as (balancer, address, prefix), etcd_client(etcd) as client:
        assert balancer.fleet is not None
        for weight in ("-1", "2000000", "-1"):
            value = f'{{"address": "{backend}", "weight": {weight}}}'
            await client.put(f"{prefix}pools/web/servers/bad", value)
        await client.put(f"{prefix}state/web/file/drain", b"{]")
        nowhere = b'{"op": "drain", "pool": "web", "server": "nowhere"}'
        await client.put(f"{prefix}state/web/nowhere/drain", nowhere)
        await settled(client, balancer, prefix, backend)
        assert balancer.fleet.bad_values == 4
        assert balancer.fleet.not_applied == 1
        lines = [r.getMessage() for r in caplog.records]
        assert len([m for m in lines if f"{prefix}pools/web/servers/bad" in m]) == 1, lines
        assert len([m for m in lines if "nowhere" in m]) == 1, lines
        assert balancer.pools["web"].find("bad") is None
        assert not balancer.pools["web"].find("file").draining
        assert await request(address, b"still") == b"still"
        stats = balancer.cluster_stats()
        assert stats is not None and stats["bad_values"] == 4


async def test_a_command_from_etcd_goes_through_the_command_path(etcd: EtcdServer,
                                                                 nursery: trio.Nursery) -> None:
    backend = (await start_backend(nursery, echo_handler)).address
    async with fleet_balancer(etcd, backend) as (balancer, _, prefix), etcd_client(etcd) as client:
        assert balancer.fleet is not None
        drain = json.dumps({"op": "drain", "pool": "web", "server": "file"})
        await client.put(f"{prefix}state/web/file/drain", drain)
        await wait_until(lambda: balancer.pools["web"].find("file").draining)  # type: ignore[union-attr]
        assert [type(c) for c in balancer.control.in_effect()] == [Drain]  # recorded as the admin's are
        await client.put(f"{prefix}state/web/file/drain", drain)  # in effect already: skipped
        await settled(client, balancer, prefix, backend)
        assert balancer.fleet.applied == 1
        # A command made here is applied here and written for the others; its echo is skipped.
        await balancer.command(Drain("web", backend))  # named by its address: written by its name
        await wait_until(lambda: balancer.fleet is not None and balancer.fleet.status()["queued"] == 0)
        written = (await client.get(f"{prefix}state/web/file/drain")).kvs[0].value
        assert json.loads(written)["server"] == "file"


async def test_a_reload_keeps_the_etcd_servers(etcd: EtcdServer, nursery: trio.Nursery) -> None:
    backend = (await start_backend(nursery, echo_handler)).address
    async with fleet_balancer(etcd, backend) as (balancer, _, prefix), etcd_client(etcd) as client:
        await client.put(f"{prefix}pools/web/servers/e1", json.dumps({"address": backend}))
        await wait_until(lambda: balancer.pools["web"].find("e1") is not None)
        config = parse_config(fleet_config(etcd, prefix, backend, retries=1), "test.toml")
        await balancer.apply_config(config)
        assert balancer.pools["web"].find("e1") is not None
        without = fleet_config(etcd, prefix, backend)
        del without["pools"]["web"]["servers_from"]
        await balancer.apply_config(parse_config(without, "test.toml"))
        assert balancer.pools["web"].find("e1") is None


@pytest.mark.slow
async def test_changes_lost_to_a_compaction_are_read_again(
    etcd: EtcdServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """While the balancer cannot reach etcd, a server key is added, one deleted and a drain written,
    then etcd compacts past them: the watch it resumes is refused (those events are gone), so it reads
    every key again, and what it holds then matches etcd, the deletion included."""
    backend = (await start_backend(nursery, echo_handler)).address
    relay = await CuttableRelay.start(nursery, etcd.client_port)
    prefix = f"/t{next(PREFIXES)}/"
    data = fleet_config(etcd, prefix, backend)
    data["cluster"]["etcd"] = [f"http://127.0.0.1:{relay.port}"]
    caplog.set_level(logging.WARNING, "trioanubis.fleet")
    async with running_balancer(data) as (balancer, address), etcd_client(etcd) as client:
        fleet, pool = balancer.fleet, balancer.pools["web"]
        assert fleet is not None
        await client.put(f"{prefix}pools/web/servers/gone", json.dumps({"address": backend}))
        await settled(client, balancer, prefix, backend)
        assert pool.find("gone") is not None
        relay.refusing = True
        relay.cut()
        await wait_until(lambda: not fleet.connected)
        await client.put(f"{prefix}pools/web/servers/late", json.dumps({"address": backend}))
        await client.delete(f"{prefix}pools/web/servers/gone")
        drain = json.dumps({"op": "drain", "pool": "web", "server": "file"})
        latest = await client.put(f"{prefix}state/web/file/drain", drain)
        await etcd.etcdctl("compact", str(latest))
        relay.refusing = False
        await wait_until(lambda: pool.find("late") is not None)
        assert pool.find("gone") is None
        await wait_until(lambda: pool.find("file").draining)  # type: ignore[union-attr]
        assert fleet.connected
        assert await request(address, b"still") == b"still"
    assert any("was compacted; reading every key again" in r.getMessage() for r in caplog.records)


async def kept_connections(client: EtcdClient, count: int) -> None:
    """`count` calls at once: each opens a connection (none is idle while they all wait on etcd), and
    each connection is kept when its call ends."""
    async with trio.open_nursery() as calls:
        for _ in range(count):
            calls.start_soon(client.get, "/kept")


async def test_the_fleet_stopping_closes_every_kept_connection(etcd: EtcdServer,
                                                               nursery: trio.Nursery) -> None:
    """The fleet closes its client on the way out of its cancelled nursery (`Fleet.run`), after calls
    that overlapped left two connections kept: the client closes both, none is left to the garbage
    collector (the second was: a ResourceWarning in a CI run)."""
    relay = await CuttableRelay.start(nursery, etcd.client_port)
    client = EtcdClient([f"http://127.0.0.1:{relay.port}"])
    await kept_connections(client, 2)
    assert (relay.connections, relay.active) == (2, 2)
    with warnings.catch_warnings(record=True) as collected:
        warnings.simplefilter("always", ResourceWarning)
        with trio.CancelScope() as stopping:
            stopping.cancel()
            await client.aclose()
        await wait_until(lambda: relay.active == 0)
        gc.collect()
    assert [str(warning.message) for warning in collected] == []


async def test_calls_at_once_after_the_kept_connections_went_stale(etcd: EtcdServer,
                                                                   nursery: trio.Nursery) -> None:
    """The fleet's tasks call etcd at once when it comes back; the connections they kept were closed by
    etcd's side meanwhile. Each call closes the stale ones it finds and opens its own (two tasks taking
    from the kept list at once raised ValueError out of the client, which stopped the fleet task and
    the balancer with it)."""
    relay = await CuttableRelay.start(nursery, etcd.client_port)
    async with EtcdClient([f"http://127.0.0.1:{relay.port}"]) as client:
        await kept_connections(client, 2)
        relay.cut()
        await wait_until(lambda: relay.active == 0)
        await kept_connections(client, 2)
        assert (relay.connections, relay.active) == (4, 2)


KINDS = st.sampled_from(["pools/web/servers/s", "pools/web/servers/file", "pools/other/servers/s",
                         "state/web/file/drain", "state/web/file/weight", "state/web/file/faults",
                         "state/web/file/member", "state/web/s/drain", "members/x", "members/t", "junk"])


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(KINDS, VALUES, st.booleans()), min_size=1, max_size=8))
async def test_hostile_values_leave_the_balancer_serving(
    etcd: EtcdServer, writes: list[tuple[str, bytes, bool]]
) -> None:
    """Whatever a tool writes under the prefix, before the start (the first read) or after (the watch):
    the balancer starts, serves, and its admin-side views still answer."""
    async with trio.open_nursery() as nursery:
        backend = (await start_backend(nursery, echo_handler)).address
        prefix = f"/f{next(PREFIXES)}/"
        async with etcd_client(etcd) as client:
            for kind, value, before in writes:
                if before:
                    await client.put(f"{prefix}{kind}", value)
            async with running_balancer(fleet_config(etcd, prefix, backend)) as (balancer, address):
                for kind, value, before in writes:
                    if not before:
                        await client.put(f"{prefix}{kind}", value)
                await settled(client, balancer, prefix, backend)
                pool = balancer.pools["web"]
                if pool.find("file") is not None:
                    await client.put(f"{prefix}state/web/file/drain",
                                     b'{"op":"enable","pool":"web","server":"file"}')  # fmt: skip
                    await client.put(f"{prefix}state/web/file/weight",
                                     b'{"op":"weight","pool":"web","server":"file","weight":1}')  # fmt: skip
                    await client.put(f"{prefix}state/web/file/faults",
                                     b'{"op":"clear_faults","pool":"web","server":"file"}')  # fmt: skip
                    await settled(client, balancer, prefix, backend)
                    assert await request(address, b"still") == b"still"
                assert balancer.fleet is not None
                assert balancer.fleet_document() is not None and balancer.cluster_stats() is not None
        nursery.cancel_scope.cancel()


async def test_a_bug_applying_a_change_is_logged_once_and_counted(etcd: EtcdServer,
                                                                  nursery: trio.Nursery) -> None:
    backend = (await start_backend(nursery, echo_handler)).address
    async with fleet_balancer(etcd, backend) as (balancer, address, prefix), etcd_client(etcd) as client:
        assert balancer.fleet is not None

        async def broken(command: object) -> None:
            raise RuntimeError("a bug")

        balancer.apply_shared = broken
        for _ in range(2):
            await client.put(f"{prefix}state/web/file/drain", b'{"op":"drain","pool":"web","server":"file"}')
        await settled(client, balancer, prefix, backend)
        assert balancer.fleet.internal_errors == 2
        assert await request(address, b"still") == b"still"


async def slow_relay(etcd: EtcdServer, delay: float, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP relay to etcd that holds each chunk of etcd's answers for `delay` seconds: a slow etcd."""

    async def pump(source: trio.SocketStream, sink: trio.SocketStream, wait: float) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                await trio.sleep(wait)
                await sink.send_all(data)
            await sink.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", etcd.client_port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, 0)
            nursery.start_soon(pump, upstream, client, delay)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@pytest.mark.slow
async def test_the_state_is_in_effect_when_the_listeners_open(etcd: EtcdServer,
                                                              nursery: trio.Nursery) -> None:
    """Even when etcd is slow to answer the first read, a balancer starts serving with its drains."""
    backend = (await start_backend(nursery, echo_handler)).address
    port = await nursery.start(slow_relay, etcd, 0.5)
    prefix = f"/t{next(PREFIXES)}/"
    async with etcd_client(etcd) as client:
        await client.put(f"{prefix}state/web/file/drain", b'{"op":"drain","pool":"web","server":"file"}')
        await client.put(f"{prefix}pools/web/servers/e1", json.dumps({"address": backend}))
    config = fleet_config(etcd, prefix, backend)
    config["cluster"]["etcd"] = [f"http://127.0.0.1:{port}"]
    async with running_balancer(config) as (balancer, address):
        pool = balancer.pools["web"]
        assert pool.find("file").draining and pool.find("e1") is not None  # type: ignore[union-attr]
        assert await request(address, b"x") == b"x"  # through e1
