"""Recycled connection tasks (proxy/connection.py's `Crew`), over real sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import (
    config_for,
    connect,
    echo_handler,
    ending,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.app import Balancer
from trioanubis.proxy import connection as connection_module
from trioanubis.proxy.connection import CONNECTION_TASK_NAME


def connection_tasks() -> list[trio.lowlevel.Task]:
    """Every connection task of this Trio run, busy or idle."""

    def walk(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
        found = [task] if task.name == CONNECTION_TASK_NAME else []
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                found += walk(child)
        return found

    return walk(trio.lowlevel.current_root_task())


def ended(balancer: Balancer, count: int) -> bool:
    return sum(balancer.access.counts.values()) == count


async def test_one_client_after_another_is_served_by_one_task(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        crew = balancer.listeners["test"].crew
        for index in range(20):
            assert await request(address, b"ping %d" % index) == b"ping %d" % index
            await wait_until(lambda: len(crew.idle) == 1)  # index + 1 ended: its task went idle
        assert crew.spawned == 1
        assert len(connection_tasks()) == 1
        assert balancer.access.counts == {"client_eof": 20}


async def test_clients_at_once_take_a_task_each_and_leave_them_for_the_next(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        crew = balancer.listeners["test"].crew

        async def clients(count: int) -> None:
            streams = [await trio.open_tcp_stream(address.host, address.port) for _ in range(count)]
            for stream in streams:
                await stream.send_all(b"hello")
            for stream in streams:  # all open at once: each has a task of its own
                assert await stream.receive_some(5) == b"hello"
            for stream in streams:
                await stream.aclose()

        await clients(10)
        await wait_until(lambda: len(crew.idle) == 10)
        await clients(10)
        await wait_until(lambda: ended(balancer, 20) and len(crew.idle) == 10)
        assert crew.spawned == 10


async def test_a_crew_keeps_at_most_its_idle_tasks_and_the_rest_end(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        crew = balancer.listeners["test"].crew
        crew.most = 3
        async with trio.open_nursery() as clients:
            for index in range(12):
                clients.start_soon(request, address, b"x" * index)
        await wait_until(lambda: ended(balancer, 12))
        await wait_until(lambda: len(connection_tasks()) == 3)
        assert len(crew.idle) == 3


async def test_a_closed_listener_s_idle_tasks_end(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        listener = balancer.listeners["test"]
        async with trio.open_nursery() as clients:
            for _ in range(5):
                clients.start_soon(request, address, b"ping")
        await wait_until(lambda: ended(balancer, 5) and len(listener.crew.idle) >= 1)
        listener.scope.cancel()  # what a reload that drops the listener does
        await listener.closed.wait()
        await wait_until(lambda: not connection_tasks())
        assert listener.crew.idle == [] and listener.crew.closed


@pytest.mark.pure_python  # patches a module function, which the compiled modules call natively
async def test_a_connection_that_ends_with_a_bug_leaves_its_task_serving_the_next(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = await start_backend(nursery, echo_handler)
    relay = connection_module.relay
    calls = 0

    def buggy_once(conn: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the first connection")
        return relay(conn)

    monkeypatch.setattr(connection_module, "relay", buggy_once)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        crew = balancer.listeners["test"].crew
        stream = await connect(address)
        async with stream:
            assert await ending(stream) == "reset"  # ended by the bug (and logged)
        await wait_until(lambda: ended(balancer, 1) and len(crew.idle) == 1)
        assert await request(address, b"second") == b"second"
        await wait_until(lambda: ended(balancer, 2))
        assert balancer.access.counts == {"internal_error": 1, "client_eof": 1}
        assert crew.spawned == 1
