"""End-to-end relay behaviour over real loopback sockets."""

from __future__ import annotations

import _socket
import errno
import hashlib
import os
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import (
    IO_BACKEND,
    awaited_frames,
    closed_without_answer,
    config_for,
    connect,
    drive_frame,
    echo_handler,
    ending,
    free_port,
    name_handler,
    no_fd_leak,
    receive_all,
    relays,
    request,
    reset,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.app import Balancer
from trioanubis.proxy import listener as listener_module
from trioanubis.proxy import relay as relay_module
from trioanubis.proxy.connection import CONNECTION_TASK_NAME
from trioanubis.proxy.relay import USE_SPLICE, Relay

MIB = 1 << 20
# Enough to fill whole chunks, so the direction switches to splice when it may.
BULK = os.urandom(4 * MIB)


@pytest.mark.slow
async def test_concurrent_large_payloads_are_byte_exact_both_ways(nursery: trio.Nursery) -> None:
    backends = [await start_backend(nursery, echo_handler, f"b{i}") for i in range(2)]
    async with running_balancer(config_for([b.address for b in backends])) as (_, address):
        results: dict[int, tuple[str, str]] = {}

        async def one(index: int) -> None:
            payload = os.urandom(16 * MIB)
            stream = await connect(address)
            async with stream, trio.open_nursery() as inner:

                async def send() -> None:
                    for offset in range(0, len(payload), 100_003):  # odd-sized writes
                        await stream.send_all(payload[offset : offset + 100_003])
                    await stream.send_eof()

                inner.start_soon(send)
                echoed = await receive_all(stream)
            results[index] = (hashlib.sha256(payload).hexdigest(), hashlib.sha256(echoed).hexdigest())

        async with trio.open_nursery() as clients:
            for index in range(4):
                clients.start_soon(one, index)
    assert len(results) == 4
    for sent, received in results.values():
        assert sent == received
    assert all(b.connections >= 1 for b in backends)


async def test_client_half_close_reaches_server_and_reply_still_arrives(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("reply-after-eof"))
    async with running_balancer(config_for([backend.address])) as (_, address):
        # name_handler answers only after it saw EOF: the FIN must cross the balancer.
        assert await request(address, b"request") == b"reply-after-eof"


async def test_server_half_close_keeps_client_direction_flowing(nursery: trio.Nursery) -> None:
    got_after_eof = trio.Event()
    received: list[bytes] = []

    async def banner_then_read(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner" * 1000)
        await stream.send_eof()
        received.append(await receive_all(stream))
        got_after_eof.set()
        await stream.aclose()

    backend = await start_backend(nursery, banner_then_read)
    async with running_balancer(config_for([backend.address])) as (_, address):
        stream = await connect(address)
        async with stream:
            assert await receive_all(stream) == b"banner" * 1000  # everything, then EOF
            await stream.send_all(b"still flowing")
            await stream.send_eof()
            with trio.fail_after(20):
                await got_after_eof.wait()
    assert received == [b"still flowing"]


@pytest.fixture(params=["splice", "copy"])
def splice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with bulk directions switching to splice, and with copying only."""
    on = request.param == "splice"
    if on and (not USE_SPLICE or IO_BACKEND != "epoll"):
        pytest.skip("splice: Linux's epoll backend only")
    monkeypatch.setattr(relay_module, "USE_SPLICE", on)
    return on


def the_relay(balancer: Balancer) -> Relay:
    [relay] = relays(balancer)
    assert isinstance(relay, Relay)
    return relay


@pytest.mark.slow
async def test_server_reset_reaches_the_client_as_a_reset(nursery: trio.Nursery, splice: bool) -> None:
    client_got_data = trio.Event()

    async def send_then_reset(stream: trio.SocketStream) -> None:
        await stream.send_all(BULK)
        await client_got_data.wait()
        reset(stream)

    backend = await start_backend(nursery, send_then_reset)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        stream = await connect(address)
        async with stream:
            data = b""
            with trio.fail_after(20):
                while len(data) < len(BULK):
                    data += await stream.receive_some(65536)
                assert data == BULK
                assert bool(the_relay(balancer).spliced) == splice
                client_got_data.set()
                assert await ending(stream) == "reset"  # not a FIN: the answer was cut
        await wait_until(lambda: balancer.access.counts.get("server_reset") == 1)


async def test_client_reset_reaches_the_server_as_a_reset(nursery: trio.Nursery, splice: bool) -> None:
    got_everything = trio.Event()
    endings: list[str] = []

    async def read_until_closed(stream: trio.SocketStream) -> None:
        received = 0
        while received < len(BULK):
            received += len(await stream.receive_some(65536))
        got_everything.set()
        endings.append(await ending(stream))

    backend = await start_backend(nursery, read_until_closed)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        stream = await connect(address)
        await stream.send_all(BULK)
        with trio.fail_after(20):
            await got_everything.wait()
        assert bool(the_relay(balancer).spliced) == splice
        reset(stream)  # a truncated upload: the server must not see a clean EOF
        await wait_until(lambda: endings == ["reset"])
        await wait_until(lambda: balancer.access.counts.get("client_reset") == 1)
        await wait_until(lambda: balancer.pools["test"].active == 0)


@pytest.mark.slow
async def test_connect_refused_closes_client_and_keeps_running(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("alive"))
    dead = f"127.0.0.1:{free_port()}"
    data = config_for([dead], eject_after=0, retries=0)
    async with running_balancer(data) as (balancer, address):
        with trio.fail_after(20):
            assert await closed_without_answer(address)
        assert balancer.pools["test"].no_server == 1
        assert balancer.access.counts == {"connect_failed": 1}
    # The same balancer shape with a live server still answers.
    async with running_balancer(config_for([backend.address])) as (_, address):
        assert await request(address) == b"alive"


@pytest.mark.pure_python
@pytest.mark.slow
async def test_a_loopback_connect_done_inside_connect_waits_for_nothing(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over loopback the handshake completes within connect(): the task is not parked for it.

    (A refused connect still waits and fails over: the test above.)
    """
    backend = await start_backend(nursery, name_handler("alive"))
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        waits: list[int] = []
        wait_writable = balancer.poller.wait_writable

        def counted(fd: int) -> object:
            waits.append(fd)
            return wait_writable(fd)

        monkeypatch.setattr(balancer.poller, "wait_writable", counted)
        for _ in range(3):
            assert await request(address) == b"alive"
        assert waits == []


@pytest.mark.pure_python
@pytest.mark.skipif(IO_BACKEND != "epoll", reason="the epoll backend's start; portable reads first")
async def test_a_relay_reads_its_client_first_on_an_event(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that has sent nothing when its connection starts is read once before connecting
    (`read_early`, which finds it empty); the relay then reads it only once its socket reported
    something, never to find it empty (an EAGAIN: a system call and an exception)."""
    backend = await start_backend(nursery, echo_handler)
    empty_reads: list[int] = []

    class Counted(_socket.socket):  # the C type the listener makes its clients' sockets of
        def recv_into(self, *args: Any) -> int:
            try:
                return super().recv_into(*args)
            except BlockingIOError:
                empty_reads.append(self.fileno())
                raise

    monkeypatch.setattr(listener_module, "_socket", SimpleNamespace(socket=Counted))
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await wait_until(lambda: bool(relays(balancer)))  # started: the client has sent nothing yet
            client_fd = the_relay(balancer).client_fd
            await stream.send_all(b"first bytes")
            assert await stream.receive_some(100) == b"first bytes"
    assert empty_reads.count(client_fd) == 1


@pytest.mark.slow
async def test_idle_timeout_resets_both_sides(nursery: trio.Nursery, splice: bool) -> None:
    endings: list[str] = []

    async def read_then_silent(stream: trio.SocketStream) -> None:
        endings.append(await ending(stream))  # reads the bulk upload, then waits: the cut ends it

    backend = await start_backend(nursery, read_then_silent)
    async with running_balancer(config_for([backend.address], idle_timeout="300ms")) as (
        balancer,
        address,
    ):
        stream = await connect(address)
        async with stream:
            await stream.send_all(BULK)  # then nothing either way
            with trio.fail_after(20):
                assert await ending(stream) == "reset"
            await wait_until(lambda: endings == ["reset"])
        assert balancer.access.counts == {"idle_timeout": 1}


@pytest.mark.slow
async def test_activity_in_one_direction_keeps_the_connection_open(nursery: trio.Nursery) -> None:
    async def trickle(stream: trio.SocketStream) -> None:
        # The behaviour under test: bytes spaced well below the idle limit, for twice
        # as long as the limit, so only activity seen since the start keeps it open.
        for _ in range(20):
            await stream.send_all(b".")
            await trio.sleep(0.1)
        await stream.aclose()

    backend = await start_backend(nursery, trickle)
    async with running_balancer(config_for([backend.address], idle_timeout="1s")) as (b, address):
        stream = await connect(address)
        async with stream:
            with trio.fail_after(20):
                assert await receive_all(stream) == b"." * 20
        await wait_until(lambda: b.access.counts.get("server_eof") == 1)


@pytest.mark.slow
async def test_cancelling_the_root_scope_closes_every_socket(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    await trio.testing.wait_all_tasks_blocked()
    with no_fd_leak():
        clients = []
        async with running_balancer(config_for([backend.address])) as (balancer, address):
            for _ in range(10):
                stream = await connect(address)
                await stream.send_all(b"hello")
                assert await stream.receive_some(5) == b"hello"
                clients.append(stream)
            assert balancer.pools["test"].active == 10
            # leaving the block cancels the balancer's nursery with connections mid-relay
        for stream in clients:  # cut by the stop: a reset, not a clean end
            with trio.fail_after(20):
                assert await ending(stream) == "reset"
            await stream.aclose()
        await wait_until(lambda: backend.active == 0)


def our_frames(task: trio.lowlevel.Task) -> list[str]:
    """The trioanubis coroutines a parked task is suspended in, outermost first."""
    return [name for name, path in awaited_frames(task) if "trioanubis" in path]


def connection_tasks() -> list[trio.lowlevel.Task]:
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    return [t for t in walk(trio.lowlevel.current_root_task()) if t.name == CONNECTION_TASK_NAME]


@pytest.mark.pure_python
@pytest.mark.slow
async def test_an_idle_connection_is_parked_in_two_frames_of_ours(nursery: trio.Nursery) -> None:
    """Each frame an idle connection keeps is memory per connection (bench/README.md): the task is
    suspended in `run_connections` and the backend's `drive`, and in nothing else of ours."""
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(b"hello")
            assert await stream.receive_some(5) == b"hello"
            await trio.testing.wait_all_tasks_blocked()
            (task,) = connection_tasks()
            drive = f"{type(balancer.poller).__qualname__}.{drive_frame(balancer.poller)}"
            frames = our_frames(task)
            assert frames[:2] == ["run_connections", drive]
            assert frames[2:] == ([] if IO_BACKEND == "epoll" else ["_direction"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["round_robin", "least_connections"])
async def test_many_short_connections(nursery: trio.Nursery, strategy: str) -> None:
    backends = [await start_backend(nursery, name_handler(f"s{i}")) for i in range(3)]
    async with running_balancer(config_for([b.address for b in backends], strategy=strategy)) as (
        _,
        address,
    ):
        answers = [await request(address) for _ in range(30)]
    assert sorted(set(answers)) == [b"s0", b"s1", b"s2"]


async def test_data_and_fin_arriving_together_are_both_relayed(nursery: trio.Nursery) -> None:
    """Data and FIN that reach the balancer in one readiness edge: the EOF must not be lost.

    The backend writes and shuts down without a checkpoint in between (os.write and shutdown
    are synchronous), so both are queued before the balancer's dispatcher looks.
    """

    async def answer_then_fin_at_once(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        os.write(stream.socket.fileno(), b"answer")
        stream.socket.shutdown(socket.SHUT_WR)
        await receive_all(stream)
        await stream.aclose()

    backend = await start_backend(nursery, answer_then_fin_at_once)
    async with running_balancer(config_for([backend.address])) as (_, address):
        for _ in range(20):
            stream = await connect(address)
            async with stream:
                await stream.send_all(b"question")
                with trio.fail_after(20):
                    assert await receive_all(stream) == b"answer"
            # The client's FIN (sent by the close above) must reach the backend, whose handler
            # then returns; only then may the balancer stop, or it would cut (reset) that
            # connection while the FIN is still on its way.
            await wait_until(lambda: backend.active == 0)


async def test_data_and_fin_from_a_client_or_a_greeting_server_are_relayed(nursery: trio.Nursery) -> None:
    """The other two ways data and FIN come in one edge: from the client (its direction's short
    read must read on), and from a server that greets and closes at once, before the relay took
    its socket (the poller saw that hang-up while nobody drove the socket: the relay starts
    knowing it)."""

    async def read_all_then_answer(stream: trio.SocketStream) -> None:
        question = await receive_all(stream)
        await stream.send_all(b"got " + question)
        await stream.aclose()

    async def greet_and_close(stream: trio.SocketStream) -> None:
        os.write(stream.socket.fileno(), b"hello and goodbye")
        stream.socket.shutdown(socket.SHUT_WR)
        await receive_all(stream)
        await stream.aclose()

    answering = await start_backend(nursery, read_all_then_answer)
    greeting = await start_backend(nursery, greet_and_close)
    async with running_balancer(config_for([answering.address])) as (_, address):
        for _ in range(20):
            stream = await connect(address)
            async with stream:
                os.write(stream.socket.fileno(), b"question")
                stream.socket.shutdown(socket.SHUT_WR)  # data and FIN in one edge, from the client
                with trio.fail_after(20):
                    assert await receive_all(stream) == b"got question"
            await wait_until(lambda: answering.active == 0)
    async with running_balancer(config_for([greeting.address])) as (_, address):
        for _ in range(20):
            stream = await connect(address)
            async with stream:
                with trio.fail_after(20):
                    assert await receive_all(stream) == b"hello and goodbye"
            await wait_until(lambda: greeting.active == 0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_listener_relays_to_an_ipv4_server(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("v4 behind v6"))
    data = config_for([backend.address], listener={"bind": "[::1]:0"})
    async with running_balancer(data) as (_, address):
        assert address.host == "::1"
        assert await request(address) == b"v4 behind v6"


@pytest.mark.slow
@pytest.mark.skipif(not USE_SPLICE or IO_BACKEND != "epoll", reason="splice: Linux's epoll backend only")
@pytest.mark.parametrize("pipes", ["available", "exhausted"])
async def test_bulk_switches_to_splice_and_falls_back_to_copying_without_pipes(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, pipes: str
) -> None:
    if pipes == "exhausted":

        def no_pipe(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(os, "pipe2", no_pipe)
    backend = await start_backend(nursery, echo_handler)
    seen: list[Relay] = []
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        payload = os.urandom(8 << 20)
        stream = await connect(address)
        async with trio.open_nursery() as inner:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            inner.start_soon(send)
            await wait_until(lambda: bool(relays(balancer)))
            seen.extend(relays(balancer))
            echoed = await receive_all(stream)
        await stream.aclose()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert seen[0].spliced == (2 if pipes == "available" else 0)


async def test_both_relayed_sockets_have_nodelay(nursery: trio.Nursery) -> None:
    """Small writes are not held back (Nagle) on either side; on Linux the client socket gets
    TCP_NODELAY from the listening socket it was accepted from, elsewhere from a call of its own."""
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(config_for([backend.address])) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"
            await wait_until(lambda: bool(relays(balancer)))
            relay = relays(balancer)[0]
            for sock in (relay.client, relay.server):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
