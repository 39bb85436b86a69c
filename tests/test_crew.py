"""Recycled connection tasks (proxy/connection.py's `Crew`), over real sockets."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import (
    config_for,
    connect,
    echo_handler,
    ending,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.app import Balancer
from trioanubis.config import parse_config
from trioanubis.proxy import connection as connection_module
from trioanubis.proxy.connection import CONNECTION_TASK_NAME, Crew


def connection_tasks() -> list[trio.lowlevel.Task]:
    """Every connection task of this Trio run, busy or idle."""

    def walk(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
        found = [task] if task.name == CONNECTION_TASK_NAME else []
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                found += walk(child)
        return found

    return walk(trio.lowlevel.current_root_task())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def burst(address: Any, count: int) -> None:
    """`count` clients open at once, then all closed: `count` connection tasks go idle together."""
    streams = [await connect(address) for _ in range(count)]
    for stream in streams:
        await stream.send_all(b"x")
    for stream in streams:
        assert await stream.receive_some(1) == b"x"
    for stream in streams:
        await stream.aclose()


@asynccontextmanager
async def stopped_from_inside(data: dict[str, Any]) -> AsyncIterator[tuple[Balancer, Any]]:
    """Run a Balancer for `data` until it returns by itself (its own stop; nothing cancels it):
    yield it and its first bound address."""
    balancer = Balancer(parse_config(data, "t.toml"))
    async with trio.open_nursery() as inner:
        bound = await inner.start(balancer.run)
        yield balancer, next(iter(bound.values()))


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


async def test_a_task_that_ends_leaves_nothing_to_the_garbage_collector(nursery: trio.Nursery) -> None:
    """An idle task's berth and the await it parks with (`parking(berth.leave)`, which holds the
    berth) go with the task, freed by their counts: kept on the berth they were a cycle, and a
    cycle waits for a full collection (the balancer raises gen0's threshold)."""
    backend = await start_backend(nursery, echo_handler)
    gc.collect()
    gc.disable()
    try:
        async with running_balancer(config_for([backend.address])) as (balancer, address):
            listener = balancer.listeners["test"]
            await burst(address, 5)
            await wait_until(lambda: ended(balancer, 5) and len(listener.crew.idle) == 5)
            assert count_alive(connection_module.Berth) == 5
            listener.scope.cancel()
            await listener.closed.wait()
            await wait_until(lambda: not connection_tasks())
            assert count_alive(connection_module.Berth) == 0
    finally:
        gc.enable()


def count_alive(kind: type) -> int:
    return sum(1 for each in gc.get_objects() if type(each) is kind)


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


async def test_an_idle_task_the_crew_no_longer_lists_leaves_quietly() -> None:
    """`run` took it and a KeyboardInterrupt came before it was handed on: cancelling it later must
    not raise inside Trio's cancel delivery."""
    crew = Crew()
    berth = connection_module.Berth(crew, trio.lowlevel.current_task())
    assert berth.leave(None) == trio.lowlevel.Abort.SUCCEEDED
    crew.idle.append(berth)
    assert berth.leave(None) == trio.lowlevel.Abort.SUCCEEDED and crew.idle == []  # listed: it leaves


# From the hostile review of recycled tasks: listeners that close, reloads, stops.


async def test_a_busy_task_of_a_removed_listener_ends_after_its_connection(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address])
    async with running_balancer(data) as (balancer, address):
        listener = balancer.listeners["test"]
        await burst(address, 5)
        await wait_until(lambda: len(listener.crew.idle) == 5)
        busy = await connect(address)
        await busy.send_all(b"a")
        assert await busy.receive_some(1) == b"a"
        data2 = {**data, "listeners": {"other": {"bind": "127.0.0.1:0", "pool": "test"}}}
        await balancer.apply_config(parse_config(data2, "b.toml"))
        await listener.closed.wait()
        await wait_until(lambda: len(connection_tasks()) == 1)  # the idle 5 ended, the busy one goes on
        await busy.send_all(b"b")
        assert await busy.receive_some(1) == b"b"
        await busy.send_eof()
        assert await receive_all(busy) == b""
        await busy.aclose()
        await wait_until(lambda: not connection_tasks() and balancer.limits.active == 0)


async def test_reloads_that_add_and_remove_listeners_leave_no_tasks_behind(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address])
    async with running_balancer(data) as (balancer, _):
        for round_ in range(6):
            listeners = {f"l{round_}_{i}": {"bind": "127.0.0.1:0", "pool": "test"} for i in range(3)}
            await balancer.apply_config(parse_config({**data, "listeners": listeners}, "r.toml"))
            for name in listeners:
                bound = balancer.listeners[name].bound
                assert bound is not None
                await burst(bound, 20)
            await wait_until(lambda: balancer.limits.active == 0)
            await wait_until(lambda: len(connection_tasks()) == 60)  # this round's 3 crews only
        assert sum(len(li.crew.idle) for li in balancer.listeners.values()) == 60


async def test_shutdown_with_idle_and_busy_tasks_waits_for_the_busy_one_only(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    fds = open_fds()
    async with stopped_from_inside(config_for([backend.address], settings={"drain_timeout": "30s"})) as (
        balancer, address
    ):
        await burst(address, 10)
        await wait_until(lambda: len(balancer.listeners["test"].crew.idle) == 10)
        busy = await connect(address)
        await busy.send_all(b"a")
        assert await busy.receive_some(1) == b"a"
        balancer.shutdown(delay=False)
        await wait_until(lambda: balancer.listeners["test"].closed.is_set())
        await wait_until(lambda: len(connection_tasks()) == 1)  # the idle ended at once
        assert balancer.limits.active == 1
        await busy.send_eof()
        assert await receive_all(busy) == b""
        await busy.aclose()
    # balancer.run returned by itself (nothing cancelled it) once the busy connection ended
    assert balancer.limits.active == 0
    assert not connection_tasks()
    assert open_fds() <= fds


async def test_a_second_stop_while_clients_arrive_loses_no_connection(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    fds = open_fds()
    async with stopped_from_inside(config_for([backend.address])) as (balancer, address):
        await burst(address, 30)
        await wait_until(lambda: len(balancer.listeners["test"].crew.idle) == 30)
        clients = [await connect(address) for _ in range(40)]  # accepted in a batch, handed to idle tasks
        balancer.shutdown(delay=False)
        balancer.shutdown()  # the second stop: everything cancelled at once
    for client in clients:
        await client.aclose()
    assert balancer.limits.active == 0
    assert sum(balancer.access.counts.values()) == balancer.limits.accepted
    assert not connection_tasks()
    assert open_fds() <= fds


# A task that ends its connection takes a client waiting in the backlog itself (`Crew.take`, the
# listener's `Acceptor`), and the listener counts its backlog before accepting (Linux).


def queued_clients(sock: Any, count: int) -> list[Any]:
    """`count` blocking clients connected to the listening `sock` (in its accept queue), each
    having sent one byte."""
    import socket

    clients = []
    for _ in range(count):
        client = socket.create_connection(sock.getsockname())
        client.sendall(b"q")
        clients.append(client)
    return clients


def listening() -> Any:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def counting() -> bool:
    from trioanubis.proxy.io import sockcalls

    return sockcalls.listen_backlog is not None


@asynccontextmanager
async def own_acceptor(nursery: trio.Nursery) -> AsyncIterator[tuple[Balancer, Any, Any]]:
    """A running balancer, and an `Acceptor` of its listener on a listening socket of the test's own
    that nobody else accepts from: yield the balancer, its address and the acceptor."""
    if not counting():
        pytest.skip("the backlog is counted on Linux only: elsewhere a task never takes a client")
    from trioanubis.proxy.listener import Acceptor

    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        with listening() as sock:
            yield balancer, address, Acceptor(balancer.listeners["test"], sock)
        await wait_until(lambda: balancer.limits.active == 0)


async def test_a_task_that_ends_its_connection_goes_on_with_the_clients_waiting(
    nursery: trio.Nursery,
) -> None:
    async with own_acceptor(nursery) as (_, _, acceptor):
        # Each client the one task below serves, it took: nobody else accepts from this socket.
        crew = Crew()
        crew.nursery = nursery
        crew.take = acceptor.take
        clients = queued_clients(acceptor.listen_sock, 3)
        await wait_until(lambda: acceptor.count() == 3)
        first = acceptor.next()
        assert first is not None and acceptor.waiting == 2
        tasks_before = len(connection_tasks())
        nursery.start_soon(connection_module.run_connections, crew, first, name=CONNECTION_TASK_NAME)
        for client in clients:
            client.settimeout(30)
            assert await trio.to_thread.run_sync(client.recv, 1) == b"q"  # served, in turn
            client.close()
        await wait_until(lambda: len(crew.idle) == 1)  # all three served, then it parked
        assert len(connection_tasks()) == tasks_before + 1 and crew.spawned == 0
        assert acceptor.count() == 0
        crew.close()


async def test_the_listener_accepts_only_counted_clients(nursery: trio.Nursery) -> None:
    async with own_acceptor(nursery) as (balancer, address, acceptor):
        sock = acceptor.listen_sock
        accepts = []

        def recorded(call: Any) -> Any:
            def accept(*args: Any) -> Any:
                try:
                    result = call(*args)
                except BlockingIOError:
                    result = None
                    raise
                finally:
                    accepts.append(result)
                return result

            return accept

        if acceptor.accept_inet is not None:
            acceptor.accept_inet = recorded(acceptor.accept_inet)
        acceptor.accept = recorded(acceptor.accept)
        assert acceptor.next() is None and accepts == []  # none counted: no accept at all
        clients = queued_clients(sock, 3)
        await wait_until(lambda: acceptor.count() == 3)
        conns = [acceptor.next() for _ in range(3)]
        assert all(conn is not None for conn in conns)
        assert acceptor.next() is None
        assert len(accepts) == 3 and None not in accepts  # never one into an empty queue
        # A count is a moment's: a client taken by another leaves the count, and ends it.
        more = queued_clients(sock, 1)
        await wait_until(lambda: acceptor.count() == 1)
        other = acceptor.accept_inet or acceptor.accept
        if acceptor.accept_inet is not None:
            taken = other(acceptor.listen_fd)
            os.close(taken[0])
        else:
            os.close(other()[0])
        accepts.clear()
        assert acceptor.next() is None and accepts == [None] and acceptor.waiting == 0
        # A task counts at most once per look of the dispatcher at its ready list.
        queued = queued_clients(sock, 1)
        await wait_until(lambda: acceptor.count() == 1)
        acceptor.waiting = 0  # as if counted empty just before the client came
        looks = balancer.poller.looks
        assert acceptor.take() is None  # counted at this look already
        poke = await connect(address)  # events for the dispatcher: it looks at its ready list
        await poke.send_all(b"p")
        assert await poke.receive_some(1) == b"p"
        await poke.aclose()
        if balancer.poller.caps.name == "portable":  # no dispatcher, no looks: no count again
            assert balancer.poller.looks == looks == 0 and acceptor.take() is None
            taken_conn = acceptor.next()
        else:
            assert balancer.poller.looks != looks
            taken_conn = acceptor.take()
        assert taken_conn is not None
        for conn in [*conns, taken_conn]:
            conn.close()
        for client in [*clients, *more, *queued]:
            client.close()


async def test_a_count_that_says_none_while_a_client_waits_cannot_stall_the_listener(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong count (always 0) must not make the listener wait forever, nor spin: the next wake-up
    after one that counted none accepts all the same, and after three clients found where none were
    counted, the listener stops counting."""
    from trioanubis.proxy.io import sockcalls

    monkeypatch.setattr(sockcalls, "listen_backlog", lambda sock, fd: 0)
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        with trio.fail_after(30):
            for _ in range(5):
                stream = await connect(address)
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                await stream.aclose()
        await wait_until(lambda: balancer.limits.active == 0)
        take = balancer.listeners["test"].crew.take
        assert take is not None and take.__self__.backlog is None  # no longer asked


# From the hostile review of tasks that take clients: a burst whose connections end at once, and
# a listener that stops.


@pytest.mark.parametrize("io", ["epoll", "portable"])
@pytest.mark.parametrize("why", ["no_server", "client_reset"])
async def test_a_burst_of_clients_that_end_at_once_is_not_served_in_one_turn(
    nursery: trio.Nursery, why: str, io: str
) -> None:
    """Clients whose connections end without waiting for anything, queued at once: every server
    down, or each client reset before its task read it (anyone can send that). The accept loop and
    the tasks that take clients share one allowance per step of the loop (ACCEPTS_PER_CHECKPOINT),
    so the other tasks keep running: a heartbeat task counts the connections ended between two of
    its own steps."""
    import socket
    import struct

    backend = await start_backend(nursery, echo_handler)
    count = 600
    async with running_balancer(config_for([backend.address], settings={"io": io})) as (balancer, address):
        pool = balancer.pools["test"]
        if why == "no_server":
            pool.mark_down(pool.servers[0], "test")

        def ended_now() -> int:
            return sum(balancer.access.counts.values())

        most = 0
        done = trio.Event()

        async def heartbeat() -> None:
            nonlocal most
            last = ended_now()
            while not done.is_set():
                await trio.lowlevel.checkpoint()
                now = ended_now()
                most, last = max(most, now - last), now

        nursery.start_soon(heartbeat)
        await trio.lowlevel.checkpoint()
        # Queued while this task holds the event loop: the kernel completes the handshakes.
        clients = [socket.create_connection((address.host, address.port)) for _ in range(count)]
        if why == "client_reset":
            for client in clients:  # an RST each: the accepted socket's first read fails
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
        try:
            await wait_until(lambda: ended_now() == count, timeout=60)
        finally:
            done.set()
            for client in clients:
                client.close()
        assert balancer.access.counts == {why: count}
        # Between two heartbeat steps run at most two batches of Trio's loop (the heartbeat first in
        # one, last in the next), so at most two steps of the accept loop: their hand-overs (64 each)
        # and the tasks' takes in the three windows around them (an allowance each). Trio shuffles
        # each batch, so the worst order is rare but possible (a CI run saw 301).
        assert most <= 5 * 64 < count, most


async def test_a_listener_that_stops_lets_no_task_take_a_client(nursery: trio.Nursery) -> None:
    """A reload that removes a listener, and a stop, stop it (`Listener.stop`); its socket closes
    when its accept loop next runs. A connection task of that listener that ends in between must
    not accept: the crew's `take` is gone at once."""
    import socket

    if not counting():
        pytest.skip("the backlog is counted on Linux only")
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        listener = balancer.listeners["test"]
        accepted = listener.accepted
        take = listener.crew.take
        assert take is not None
        acceptor = take.__self__
        # Queued while this task holds the event loop: the accept loop cannot see it yet.
        client = socket.create_connection((address.host, address.port))
        deadline = trio.current_time() + 30
        while acceptor.count() != 1:  # the handshake's last ACK lands in the queue
            assert trio.current_time() < deadline
        listener.stop()  # what a reload that removes it, and a stop, do
        assert listener.crew.take is None  # what a task that ends now reads: it takes nothing
        await listener.closed.wait()
        assert listener.accepted == accepted  # the waiting client was never accepted
        client.close()
