"""The readiness layer on its own (trioanubis.proxy.io), in the style of trio's _core/_tests/test_io.py.

Every test runs on each backend this machine has (epoll only where it exists)
and, where the socket kind matters, on a socketpair and on real loopback TCP.
A pump's rule is followed as the relay follows it: wait only after a system
call showed the socket drained, and after a short read on a socket in
`hung_up` read again instead of waiting.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

from tests.conftest import COMPILED_RUN, awaited_frames, drive_frame, standalone_relay
from tests.helpers import BACKENDS, fill, running, socket_pair
from trioanubis.config import parse_config
from trioanubis.errors import AttemptCancelled, ConfigError
from trioanubis.proxy.io import IO_CHOICES, WRITE, Readiness, epoll_available, sockcalls
from trioanubis.proxy.io.epoll import ready_from
from trioanubis.proxy.io.portable import PortableReadiness
from trioanubis.proxy.relay import CHUNK_SIZE, Relay

KINDS = ["socketpair", "tcp"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def drain(sock: socket.socket) -> bytes:
    """Read until EAGAIN or EOF."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_wait_then_data(backend_name: str, kind: str) -> None:
    with socket_pair(kind) as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            assert drain(a) == b""  # EAGAIN first: only then may we wait
            woken = trio.Event()

            async def reader() -> None:
                await backend.wait_readable(a.fileno())
                woken.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert not woken.is_set()  # nothing to read: still parked
                b.send(b"hello")
                with trio.fail_after(10):
                    await woken.wait()
            assert a.recv(100) == b"hello"


@pytest.mark.parametrize("kind", KINDS)
async def test_data_already_there_when_parking(backend_name: str, kind: str) -> None:
    with socket_pair(kind) as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            b.send(b"early")  # arrives before the wait: its edge must still wake us
            with trio.fail_after(10):
                await backend.wait_readable(a.fileno())
            assert a.recv(100) == b"early"


@pytest.mark.parametrize("kind", KINDS)
async def test_fin_queued_behind_data_is_seen_without_a_new_edge(backend_name: str, kind: str) -> None:
    """A short read returns only the data; the FIN behind it must not be waited for in vain."""
    with socket_pair(kind) as (a, b):
        async with running(backend_name) as backend:
            fd = a.fileno()
            backend.register(fd)
            assert drain(a) == b""
            got = bytearray()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:

                    async def peer() -> None:
                        await trio.testing.wait_all_tasks_blocked()
                        b.send(b"last words")
                        b.shutdown(socket.SHUT_WR)  # data and FIN in one edge

                    nursery.start_soon(peer)
                    await backend.wait_readable(fd)
                    while True:
                        try:
                            data = a.recv(65536)
                        except BlockingIOError:
                            await backend.wait_readable(fd)
                            continue
                        if not data:
                            break
                        got += data
                        if fd not in backend.hung_up:  # the relay's rule after a short read
                            await backend.wait_readable(fd)
            assert bytes(got) == b"last words"


async def test_peer_reset_while_parked(backend_name: str) -> None:
    with socket_pair("tcp") as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            async with trio.open_nursery() as nursery:

                async def peer() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    reset(b)

                nursery.start_soon(peer)
                with trio.fail_after(10):
                    await backend.wait_readable(a.fileno())
            if backend.caps.name == "epoll":
                assert a.fileno() in backend.hung_up
            with pytest.raises(ConnectionResetError):
                a.recv(100)


async def test_a_reused_descriptor_number_starts_clean(backend_name: str) -> None:
    """A socket closed behind the backend's back leaves its number `hung_up`; the next socket given
    that number must not inherit it (it would be read as if its peer had closed)."""
    with socket_pair("tcp") as (a, b), socket_pair("tcp") as (c, d):
        async with running(backend_name) as backend:
            number = a.fileno()
            backend.register(number)
            reset(b)
            with trio.fail_after(10):
                await backend.wait_readable(number)
            if backend.caps.name == "epoll":
                assert number in backend.hung_up
            a.close()  # not through the backend: the kernel drops it from the epoll by itself
            os.dup2(c.fileno(), number)  # a new connection under the old number
            with socket.socket(fileno=number) as reused:
                backend.register(reused.fileno())
                assert number not in backend.hung_up
                d.sendall(b"fresh")
                with trio.fail_after(10):
                    await backend.wait_readable(number)
                assert reused.recv(100) == b"fresh"
                backend.forget(number)


async def test_close_while_parked_raises_closed_resource_error(backend_name: str) -> None:
    with socket_pair("tcp") as (a, _):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            fill(a)
            errors: list[type[BaseException]] = []

            async def wait(kind: str) -> None:
                try:
                    if kind == "read":
                        await backend.wait_readable(a.fileno())
                    else:
                        await backend.wait_writable(a.fileno())
                except trio.ClosedResourceError as exc:
                    errors.append(type(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, "read")
                nursery.start_soon(wait, "write")
                await trio.testing.wait_all_tasks_blocked()
                assert not errors
                backend.forget(a.fileno())
            assert errors == [trio.ClosedResourceError, trio.ClosedResourceError]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, "write")
                await trio.testing.wait_all_tasks_blocked()
                backend.close(a)
            assert errors == [trio.ClosedResourceError] * 3
            assert a.fileno() == -1


async def test_interrupt_raises_the_given_error_in_the_waiter_only(backend_name: str) -> None:
    with socket_pair("tcp") as (a, _), socket_pair("tcp") as (c, d):
        async with running(backend_name) as backend:
            for sock in (a, c):
                backend.register(sock.fileno())
                fill(sock)
            assert not backend.interrupt(a.fileno(), AttemptCancelled)  # nothing waits yet
            outcomes: dict[str, str] = {}

            async def wait(name: str, sock: socket.socket) -> None:
                try:
                    await backend.wait_writable(sock.fileno())
                    outcomes[name] = "woken"
                except AttemptCancelled:
                    outcomes[name] = "interrupted"

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, "a", a)
                nursery.start_soon(wait, "c", c)
                await trio.testing.wait_all_tasks_blocked()
                assert backend.interrupt(a.fileno(), AttemptCancelled)
                await trio.testing.wait_all_tasks_blocked()
                assert outcomes == {"a": "interrupted"}  # c still parked
                with trio.fail_after(10):
                    while not outcomes.get("c"):
                        drain(d)
                        await trio.testing.wait_all_tasks_blocked(0.01)
            assert outcomes == {"a": "interrupted", "c": "woken"}


async def test_cancelling_a_parked_task_unparks_it(backend_name: str) -> None:
    with socket_pair("tcp") as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            with trio.move_on_after(0.05) as scope:
                await backend.wait_readable(a.fileno())
            assert scope.cancelled_caught
            # The waiter was removed: the same socket can be waited on again, and wakes.
            b.send(b"x")
            with trio.fail_after(10):
                await backend.wait_readable(a.fileno())
            assert a.recv(10) == b"x"


async def test_two_readers_of_one_socket_is_an_error(backend_name: str) -> None:
    with socket_pair("tcp") as (a, _):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.wait_readable, a.fileno())
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await backend.wait_readable(a.fileno())
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def driven(backend: Readiness) -> AsyncIterator[tuple[Relay, socket.socket, socket.socket]]:
    """A relay between two loopback connections, run by `backend`; yields it and both far ends.

    The far ends: what the client and the server hold. The relay's own sockets
    are closed at the end, as connection.py closes them.
    """
    with socket_pair("tcp") as (near_client, client), socket_pair("tcp") as (near_server, server):
        relay = standalone_relay(backend, near_client, near_server)
        backend.register(near_server.fileno())
        yield relay, client, server


async def received(sock: socket.socket, size: int) -> bytes:
    got = b""
    with trio.fail_after(10):
        while len(got) < size:
            got += drain(sock)
            await trio.testing.wait_all_tasks_blocked(0.01)
    return got


async def closed(sock: socket.socket) -> None:
    """Wait until the peer of `sock` closed (EOF or a reset)."""
    with trio.fail_after(10):
        while True:
            try:
                if sock.recv(65536) == b"":
                    return
            except BlockingIOError:
                await trio.sleep(0.01)
            except ConnectionResetError:
                return


@pytest.mark.slow
async def test_a_relay_is_one_task_for_both_directions_on_epoll(backend_name: str) -> None:
    async with running(backend_name) as backend, driven(backend) as (relay, client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.testing.wait_all_tasks_blocked()
            (task,) = nursery.child_tasks
            # epoll: the relay's task runs both directions with no nursery of its own;
            # portable: one task per direction, in a nursery of the relay's task.
            assert len(task.child_nurseries) == (0 if backend_name == "epoll" else 1)
            for _ in range(3):  # an exchange: both directions, taken by the dispatcher on epoll
                client.send(b"ping")
                assert await received(server, 4) == b"ping"
                server.send(b"pong!")
                assert await received(client, 5) == b"pong!"
            assert relay.up is not None and relay.down is not None
            assert (relay.up.bytes, relay.down.bytes) == (12, 15)
            client.shutdown(socket.SHUT_WR)  # half-close: the other direction keeps flowing
            await closed(server)
            server.send(b"late")
            assert await received(client, 4) == b"late"
            server.shutdown(socket.SHUT_WR)
        assert relay.conn.end == "client_eof"


@pytest.mark.skipif(not epoll_available(), reason="no epoll here")
async def test_eofs_from_both_sides_in_one_batch_close_with_no_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epoll passes a server's first EOF on after its next batch of events: when the client's EOF
    comes before that (a client that closes once it has its answer), the close sends both FINs
    and no shutdown is made. (A client waiting for the FIN gets it: test_server_half_close...)"""
    shut: list[int] = []
    shutdown = socket.socket.shutdown

    def counted(sock: socket.socket, how: int) -> None:
        shut.append(sock.fileno())
        shutdown(sock, how)

    monkeypatch.setattr(socket.socket, "shutdown", counted)
    async with running("epoll") as backend, driven(backend) as (relay, client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.testing.wait_all_tasks_blocked()
            server.send(b"answer")
            assert await received(client, 6) == b"answer"
            server.shutdown(socket.SHUT_WR)  # both FINs queued before the dispatcher looks again
            client.shutdown(socket.SHUT_WR)
        ours = {relay.client_fd, relay.server_fd}
        assert relay.conn.end == "server_eof"
        assert not ours & set(shut)  # connection.py's close sends each side its FIN


@pytest.mark.pure_python
@pytest.mark.skipif(not epoll_available(), reason="no epoll here")
async def test_a_clients_first_eof_is_passed_on_at_once() -> None:
    """Only a server's first EOF waits for epoll's next batch: a server waits for the client's EOF
    as a rule (to answer, or to close), so the relay shuts down writing towards it at once."""
    held: list[object] = []
    async with running("epoll") as backend, driven(backend) as (relay, client, server):
        pass_eof = backend.pass_eof
        backend.pass_eof = lambda r, direction: (held.append(direction), pass_eof(r, direction))  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.testing.wait_all_tasks_blocked()
            client.shutdown(socket.SHUT_WR)
            await trio.lowlevel.wait_readable(server)
            assert server.recv(1) == b""  # the client's FIN reached the server
            server.send(b"bye")
            server.shutdown(socket.SHUT_WR)
            assert await received(client, 3) == b"bye"
        assert relay.conn.end == "client_eof"
        assert relay.up not in held


async def test_server_bytes_that_came_before_the_relay_started_are_relayed(backend_name: str) -> None:
    """A server that speaks first (a banner) before the relay runs: the dispatcher saw its event
    with nobody waiting, so the relay must read before it waits (epoll: `_unclaimed`)."""
    async with running(backend_name) as backend, driven(backend) as (relay, client, server):
        server.send(b"220 banner")
        await trio.testing.wait_all_tasks_blocked()  # the dispatcher has taken the event by now
        client.send(b"hello")  # the client's first bytes are there too when the relay starts
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            assert await received(client, 10) == b"220 banner"
            assert await received(server, 5) == b"hello"
            client.shutdown(socket.SHUT_WR)
            await closed(server)  # the client's EOF went through first
            server.shutdown(socket.SHUT_WR)
        assert relay.conn.end == "client_eof"


async def test_a_direction_blocked_on_a_full_peer_resumes_when_it_reads(backend_name: str) -> None:
    """Sockets join for reading only on epoll: a full destination must still wake its direction."""
    async with running(backend_name) as backend, driven(backend) as (relay, client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.testing.wait_all_tasks_blocked()
            sent = 0
            chunk = b"y" * 65536
            with trio.fail_after(10):
                while relay.down is None or relay.down.wants != WRITE:  # until the client is full
                    try:
                        sent += server.send(chunk)
                    except BlockingIOError:
                        await trio.testing.wait_all_tasks_blocked(0.01)
            server.shutdown(socket.SHUT_WR)
            assert len(await received(client, sent)) == sent  # reading frees room: the rest follows
            client.shutdown(socket.SHUT_WR)
        assert relay.conn.end == "server_eof"


@pytest.mark.pure_python
async def test_an_idle_relay_awaits_the_backend_with_no_frame_of_the_relay_between(backend_name: str) -> None:
    """Every frame an idle connection's task keeps is memory per connection: `run` adds none."""
    async with running(backend_name) as backend, driven(backend) as (relay, _, _):

        async def connection() -> None:  # connection.py's shape
            await relay.run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection)
            await trio.testing.wait_all_tasks_blocked()
            (task,) = nursery.child_tasks
            frames = [name for name, _ in awaited_frames(task)]
            assert frames[:2] == ["test_an_idle_relay_awaits_the_backend_with_no_frame_of_the_relay_between."
                                  "<locals>.connection", f"{type(backend).__name__}.{drive_frame(backend)}"
                                  ]  # fmt: skip
            assert not [name for name in frames if name.startswith("Relay.")]
            relay.conn.end_with("idle_timeout")


async def test_cancelling_a_spliced_relay_closes_its_pipe() -> None:
    """The backend calls `relay.stopped()` however `drive` ends: the splice pipe goes with it."""
    if not epoll_available():
        pytest.skip("splice needs the epoll backend")
    async with running("epoll") as backend, driven(backend) as (relay, client, server):
        scope = trio.CancelScope()

        async def connection() -> None:
            with scope:
                await relay.run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection)
            await trio.testing.wait_all_tasks_blocked()
            client.send(bytes(CHUNK_SIZE))  # a full chunk: the direction turns bulk
            await received(server, CHUNK_SIZE)
            assert relay.up is not None and relay.spliced == 1
            pipe = relay.up.pipe_in
            assert pipe >= 0
            scope.cancel()
        assert relay.up.pipe_in == -1
        with pytest.raises(OSError):
            os.fstat(pipe)


async def test_finishing_a_parked_relay_from_outside_ends_its_run(backend_name: str) -> None:
    async with running(backend_name) as backend, driven(backend) as (relay, _, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.testing.wait_all_tasks_blocked()
            relay.conn.end_with("idle_timeout")  # what the Timer does
        assert relay.conn.end == "idle_timeout" and relay.over


@pytest.mark.pure_python
async def test_a_step_that_raises_ends_only_its_own_relay(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_advance = Relay.advance
    bad: list[Relay] = []

    def advance(relay: Relay, direction: object) -> int:
        if relay in bad:
            raise RuntimeError("a bug in a step")
        return real_advance(relay, direction)  # type: ignore[arg-type]

    monkeypatch.setattr(Relay, "advance", advance)
    async with running(backend_name) as backend, driven(backend) as (buggy, client, _), \
            driven(backend) as (fine, other_client, other_server):  # fmt: skip
        raised: list[BaseException] = []

        async def run_buggy() -> None:
            try:
                await buggy.run()
            except Exception as exc:  # what connection.py does: log it, end that connection
                raised.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_buggy)
            nursery.start_soon(fine.run)
            await trio.testing.wait_all_tasks_blocked()
            bad.append(buggy)  # from the next step on (the dispatcher's, on epoll)
            client.send(b"boom")
            with trio.fail_after(10):
                while not raised:
                    await trio.testing.wait_all_tasks_blocked(0.01)
            assert "a bug in a step" in repr(raised[0])
            # The backend and the other relay still serve.
            other_client.send(b"fine")
            assert await received(other_server, 4) == b"fine"
            fine.conn.end_with("idle_timeout")


async def test_a_relay_starts_knowing_of_a_hang_up_seen_before_it(backend_name: str) -> None:
    """A server's bytes and FIN that came in one edge before the relay took its socket: the relay
    reads on after the bytes (the direction knows of the hang-up from the start) and passes the EOF
    on, with no new edge to wait for."""
    async with running(backend_name) as backend, driven(backend) as (relay, client, server):
        server.send(b"greeting")
        server.shutdown(socket.SHUT_WR)
        if backend.caps.name == "epoll":  # the dispatcher took the edge while nobody drove the socket
            with trio.fail_after(10):
                while relay.server_fd not in backend.hung_up:
                    await trio.testing.wait_all_tasks_blocked(0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            assert await received(client, 8) == b"greeting"
            await closed(client)
            client.shutdown(socket.SHUT_WR)  # the second EOF: the relay ends
        assert relay.over


async def test_cancelling_a_relay_parked_on_both_sockets_closes_both(backend_name: str) -> None:
    async with running(backend_name) as backend, driven(backend) as (relay, client, server):
        scope = trio.CancelScope()

        async def connection() -> None:  # connection.py's shape: run, and close both in `finally`
            try:
                with scope:
                    await relay.run()
            finally:
                assert relay.server is not None
                backend.close(relay.server)
                backend.close(relay.client)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        assert scope.cancelled_caught and relay.conn.end == ""
        await closed(client)
        await closed(server)


async def test_connect_wait_through_the_backend(backend_name: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        async with running(backend_name) as backend:
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex(listener.getsockname())
            backend.register(sock.fileno())  # right after EINPROGRESS, as connection.py does
            with trio.fail_after(10):
                await backend.wait_writable(sock.fileno())
            assert code in (0, errno.EINPROGRESS) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            backend.close(sock)


@pytest.mark.slow
@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none()))
def test_settings_io_accepts_its_choices_and_names_the_key_otherwise(value: object) -> None:
    data: dict[str, object] = {
        "listeners": {"a": {"bind": ":0", "pool": "p"}},
        "pools": {"p": {"servers": ["127.0.0.1:1"]}},
    }
    if value is not None:
        data["settings"] = {"io": value}
    try:
        config = parse_config(data)
    except ConfigError as exc:
        assert "settings.io" in str(exc)
        assert value not in IO_CHOICES or (value == "epoll" and not epoll_available())
    else:
        assert config.settings.io == (value if value is not None else "auto")


async def test_the_backends_read_trios_clock_as_trio_reads_it(backend_name: str) -> None:
    """`now` reads Trio's own clock without its Python method (`clock` None), and reads the same."""
    async with running(backend_name) as backend:
        await trio.testing.wait_all_tasks_blocked()  # the backend's task has taken the run's clock
        before, read, after = trio.current_time(), backend.now(), trio.current_time()
        assert backend.clock is None
        assert before <= read <= after


def test_any_other_clock_is_read_through_its_own_method() -> None:
    poller = PortableReadiness()
    mock = trio.testing.MockClock()
    mock.jump(7.0)
    poller.take_clock(mock)
    assert poller.clock == mock.current_time
    assert poller.now() == mock.current_time()

    class SystemClock(trio.abc.Clock):  # named as Trio's, with an offset, but reading otherwise
        offset = 5.0

        def start_clock(self) -> None: ...
        def current_time(self) -> float:
            return 0.0

        def deadline_to_sleep_time(self, deadline: float) -> float:
            return 0.0

    other = SystemClock()
    poller.take_clock(other)
    assert poller.clock == other.current_time
    assert poller.now() == 0.0


# ---------------------------------------------------------------- the relay's system calls (sockcalls.py)

SOCKCALLS = [pytest.param((sockcalls._recv_into, sockcalls._send), id="socket-methods")]
if sockcalls.BUILT:
    from trioanubis.proxy.io import _sockcalls

    SOCKCALLS.append(pytest.param((_sockcalls.recv_into, _sockcalls.send), id="c-helper"))


def test_the_compiled_build_has_the_c_helper() -> None:
    """Built with the compiled modules (setup.py), and the relay calls it."""
    if not COMPILED_RUN:
        pytest.skip("only the compiled build (ANUBIS_EXPECT_COMPILED=1) must have it")
    assert sockcalls.BUILT
    assert sockcalls.recv_into is _sockcalls.recv_into and sockcalls.send is _sockcalls.send
    assert sockcalls.connect_inet is _sockcalls.connect_inet


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("calls", SOCKCALLS)
def test_sockcalls_answer_as_the_socket_methods_do(kind: str, calls: tuple[Any, Any]) -> None:
    """Bytes, EAGAIN as a number (-1 reading, 0 sending), EOF as 0, and the socket module's errors."""
    recv_into, send = calls
    buffer = memoryview(bytearray(CHUNK_SIZE))
    with socket_pair(kind) as (a, b):
        assert recv_into(a, a.fileno(), buffer) == -1  # nothing yet
        payload = memoryview(b"0123456789")
        assert send(b, b.fileno(), payload, 4) == 4  # only buffer[:count]
        assert wait_for_bytes(recv_into, a, buffer) == 4
        assert bytes(buffer[:4]) == b"0123"
        big = memoryview(b"x" * 65536)
        while send(b, b.fileno(), big, len(big)):  # until the kernel's buffers are full: 0, not an exception
            pass
        b.shutdown(socket.SHUT_WR)
        total = 0
        while (got := recv_into(a, a.fileno(), buffer)) != 0:
            total += max(got, 0)
        assert total > 0  # everything fill() sent, then EOF as 0
    with socket_pair(kind) as (a, b):
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # a reset (a socketpair: a plain close)
        if kind == "tcp":
            with pytest.raises(ConnectionResetError):
                wait_for_bytes(recv_into, a, buffer)
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                send(a, a.fileno(), payload, len(payload))
        else:
            assert wait_for_bytes(recv_into, a, buffer) == 0
            with pytest.raises(BrokenPipeError):
                send(a, a.fileno(), payload, len(payload))


def wait_for_bytes(recv_into: Any, sock: socket.socket, buffer: memoryview) -> int:
    """`recv_into` once the socket has something to say (bytes, EOF or an error): no timing."""
    select.select([sock], [], [], 10)
    return int(recv_into(sock, sock.fileno(), buffer))


def test_the_c_helper_refuses_bad_arguments_cleanly() -> None:
    if not sockcalls.BUILT:
        pytest.skip("the C helper is built with the compiled modules only")
    buffer = memoryview(bytearray(16))
    with socket_pair("socketpair") as (a, _):
        with pytest.raises(TypeError):
            _sockcalls.recv_into(a, a.fileno())  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="non-negative"):
            _sockcalls.recv_into(a, -1, buffer)
        with pytest.raises(BufferError):
            _sockcalls.recv_into(a, a.fileno(), memoryview(b"read-only"))
        with pytest.raises(ValueError, match="within the buffer"):
            _sockcalls.send(a, a.fileno(), buffer, 17)
        with pytest.raises(OSError) as raised:
            _sockcalls.recv_into(a, 1_000_000, buffer)  # no such descriptor
        assert raised.value.errno == errno.EBADF


@pytest.mark.parametrize("calls", SOCKCALLS)
def test_sockcalls_take_any_view_as_the_socket_methods_do(calls: tuple[Any, Any]) -> None:
    """A slice reads and sends in place; bytes and bytearrays work too; a released or strided view,
    or a read-only one to read into, raises what the socket module raises (the C helper reads a
    memoryview's own view instead of asking it for a buffer: here is where that could go wrong)."""
    recv_into, send = calls
    storage = bytearray(16)
    with socket_pair("tcp") as (a, b):
        assert send(b, b.fileno(), memoryview(b"--abcd")[2:], 4) == 4
        assert wait_for_bytes(recv_into, a, memoryview(storage)[5:]) == 4
        assert bytes(storage) == bytes(5) + b"abcd" + bytes(7)
        assert send(b, b.fileno(), b"plain bytes", 5) == 5  # not a view: the buffer protocol
        assert wait_for_bytes(recv_into, a, bytearray(8)) == 5
        released = memoryview(bytearray(8))
        released.release()
        with pytest.raises(ValueError, match="released"):
            send(b, b.fileno(), released, 0)
        with pytest.raises((ValueError, TypeError)):  # the socket method's error is a TypeError
            recv_into(a, a.fileno(), released)
        strided = memoryview(bytearray(16))[::2]
        with pytest.raises(BufferError):
            send(b, b.fileno(), strided, len(strided))
        with pytest.raises((BufferError, TypeError)):
            recv_into(a, a.fileno(), strided)
        with pytest.raises((BufferError, TypeError)):
            recv_into(a, a.fileno(), memoryview(b"read-only"))


# Makes the first recv and send on descriptor $EINTR_FD raise SIGUSR1 and fail with EINTR, as a
# signal during a system call does: a non-blocking call almost never sees one on its own.
_EINTR_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
static int fired;
static int interrupt(int fd) {
    const char *target = getenv("EINTR_FD");
    if (target == NULL || fired || atoi(target) != fd) return 0;
    fired = 1;
    raise(SIGUSR1);
    errno = EINTR;
    return 1;
}
ssize_t recv(int fd, void *buf, size_t len, int flags) {
    ssize_t (*real)(int, void *, size_t, int) = dlsym(RTLD_NEXT, "recv");
    return interrupt(fd) ? -1 : real(fd, buf, len, flags);
}
ssize_t send(int fd, const void *buf, size_t len, int flags) {
    ssize_t (*real)(int, const void *, size_t, int) = dlsym(RTLD_NEXT, "send");
    return interrupt(fd) ? -1 : real(fd, buf, len, flags);
}
"""

_RELEASE_IN_A_HANDLER = textwrap.dedent("""
    import os, signal, socket, sys
    from trioanubis.proxy.io import sockcalls
    assert sockcalls.BUILT
    a, b = socket.socketpair()
    a.setblocking(False)
    scratch = memoryview(bytearray(4096))
    scratch[:] = b"S" * 4096
    tried = []
    def handler(signum, frame):
        try:
            scratch.release()  # would free the bytes the retried call uses
        except BufferError:
            tried.append("refused")
        else:
            tried.append("released")
    signal.signal(signal.SIGUSR1, handler)
    os.environ["EINTR_FD"] = str(a.fileno())
    if sys.argv[1] == "recv":
        b.send(b"X" * 100)
        got = sockcalls.recv_into(a, a.fileno(), scratch)
        print(tried, got, bytes(scratch[:100]) == b"X" * 100)
    else:
        got = sockcalls.send(a, a.fileno(), scratch, 64)
        print(tried, got, b.recv(64) == b"S" * 64)
""")


@pytest.mark.parametrize("call", ["recv", "send"])
def test_a_signal_handler_cannot_release_the_view_a_retried_call_uses(call: str, tmp_path: Path) -> None:
    """The C helper reads a memoryview in place and retries after EINTR, running the signal
    handlers first: one that releases the view (freeing its bytes) is refused, as while any buffer
    of it is exported, and the retried call reads into and sends from the view's own bytes."""
    if not sockcalls.BUILT:
        pytest.skip("the C helper is built with the compiled modules only")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the EINTR shim with")
    (tmp_path / "shim.c").write_text(_EINTR_SHIM)
    shim = tmp_path / "shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"],
                   check=True)  # fmt: skip
    env = {**os.environ, "LD_PRELOAD": str(shim), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", _RELEASE_IN_A_HANDLER, call], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = 100 if call == "recv" else 64
    assert result.stdout.split("\n")[0] == f"['refused'] {expected} True"


def test_the_packed_ready_list_says_what_select_epoll_says() -> None:
    """`epoll_ready` (the C helper's) and `ready_from` (anywhere) pack each descriptor's events as
    `fd << 3` and three bits: readable, writable, hung up; for bytes, space, a FIN and a reset."""
    if not hasattr(select, "epoll"):
        pytest.skip("epoll is Linux's")
    read, write, hung_up, shift = (sockcalls.READY_READ, sockcalls.READY_WRITE, sockcalls.READY_HUNG_UP,
                                   sockcalls.READY_SHIFT)  # fmt: skip
    pairs = [(5, select.EPOLLIN), (6, select.EPOLLOUT), (7, select.EPOLLIN | select.EPOLLRDHUP),
             (8, select.EPOLLERR | select.EPOLLHUP)]
    assert ready_from(pairs) == [5 << shift | read, 6 << shift | write, 7 << shift | read | hung_up,
                                           8 << shift | read | write | hung_up]  # fmt: skip
    flags = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

    def packed(epoll: select.epoll) -> list[int]:
        """The packed list, taken once: the C helper's where it was built, else `ready_from`'s."""
        if sockcalls.epoll_ready is None:
            return ready_from(epoll.poll(0))
        return sockcalls.epoll_ready(epoll.fileno(), 1024)

    with select.epoll() as epoll, socket_pair("tcp") as (a, b):
        epoll.register(a.fileno(), flags)
        assert packed(epoll) == [a.fileno() << shift | write]  # space to send: registering reports it
        assert packed(epoll) == []  # edge-triggered: nothing new
        b.send(b"x")
        select.select([a], [], [], 10)
        assert packed(epoll) == [a.fileno() << shift | read | write]
        b.shutdown(socket.SHUT_WR)
        select.select([a], [], [], 10)
        assert packed(epoll) == [a.fileno() << shift | read | write | hung_up]
    with select.epoll() as epoll, socket_pair("tcp") as (a, b):
        epoll.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # a reset: EPOLLERR and EPOLLHUP with EPOLLIN
        select.select([a], [], [], 10)
        assert packed(epoll) == [a.fileno() << shift | read | write | hung_up]
    if sockcalls.epoll_ready is None:
        return
    with select.epoll() as epoll:
        for maxevents in (0, 1025, -1):
            with pytest.raises(ValueError, match="1 to 1024"):
                sockcalls.epoll_ready(epoll.fileno(), maxevents)
        with pytest.raises(OSError) as raised:
            sockcalls.epoll_ready(1_000_000, 1)
        assert raised.value.errno == errno.EBADF
        with socket.socket() as plain, pytest.raises(OSError) as raised:
            sockcalls.epoll_ready(plain.fileno(), 1)  # not an epoll
        assert raised.value.errno == errno.EINVAL


CONNECTS = [pytest.param(sockcalls.connect_tcp, id="socket-methods")]
if sockcalls.BUILT:
    CONNECTS.append(pytest.param(_sockcalls.connect_inet, id="c-helper"))


def new_nonblocking_socket() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("connect", CONNECTS)
def test_connect_calls_answer_as_connect_ex_does(connect: Any) -> None:
    """0 for a loopback connect finished inside the call (asked with `at_once`), EINPROGRESS while it
    goes on, a refusal through SO_ERROR; TCP_NODELAY set either way."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()
        with new_nonblocking_socket() as sock:
            assert connect(sock, sock.fileno(), address, True, True) == 0  # the handshake ran in the call
            assert sock.getpeername() == address
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with new_nonblocking_socket() as sock:
            assert connect(sock, sock.fileno(), address, False, False) == errno.EINPROGRESS  # not asked
            select.select([], [sock], [], 10)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with new_nonblocking_socket() as sock:  # the listener is gone: refused
        code = connect(sock, sock.fileno(), address, False, True)
        if code == errno.EINPROGRESS:
            select.select([], [sock], [], 10)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert code == errno.ECONNREFUSED


def half_open_to(address: tuple[str, int]) -> int:
    """Connections to 127.0.0.1:port whose handshake waits for its last ACK (SYN_RECV, Linux)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == f"0100007F:{address[1]:04X}" and row[3] == "03")


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp") or not hasattr(socket, "TCP_QUICKACK"),
                    reason="reads Linux's /proc/net/tcp")  # fmt: skip
@pytest.mark.parametrize("connect", CONNECTS)
def test_connect_calls_delay_the_handshake_s_last_ack_only_when_asked(connect: Any) -> None:
    """`delay_ack` keeps the last ACK for the bytes that follow (the server sees a half-open
    connection meanwhile); without it the handshake ends inside the call. The delayed ACK's timer
    (40 ms at least) may fire before the table is read on a loaded machine: one of three will do."""

    def half_open_after_connect(delay_ack: bool) -> int:
        with socket.socket() as listener, new_nonblocking_socket() as sock:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            address = listener.getsockname()
            assert connect(sock, sock.fileno(), address, delay_ack, True) == 0  # done at once at our end
            return half_open_to(address)

    assert [half_open_after_connect(False) for _ in range(3)] == [0, 0, 0]
    assert 1 in [half_open_after_connect(True) for _ in range(3)]


def test_the_c_helpers_connect_refuses_what_is_not_an_ipv4_address() -> None:
    if not sockcalls.BUILT:
        pytest.skip("the C helper is built with the compiled modules only")
    with new_nonblocking_socket() as sock:
        fd = sock.fileno()
        for sockaddr, error, words in [
            (("::1", 80, 0, 0), TypeError, "a .host, port. tuple"),
            (("localhost", 80), ValueError, "not a dotted IPv4 address"),
            (("127.0.0.1\x00junk", 80), TypeError, "null character"),  # connect_ex refuses it too
            (("127.0.0.1", 65536), OverflowError, "0-65535"),
            ((b"127.0.0.1", 80), TypeError, None),
            (("127.0.0.1", "80"), TypeError, None),
        ]:
            with pytest.raises(error, match=words):
                _sockcalls.connect_inet(sock, fd, sockaddr, False, False)
        with pytest.raises(ValueError, match="non-negative"):
            _sockcalls.connect_inet(sock, -1, ("127.0.0.1", 80), False, False)
        with pytest.raises(OSError) as raised:
            _sockcalls.connect_inet(sock, 1_000_000, ("127.0.0.1", 80), False, False)  # no such descriptor
        assert raised.value.errno == errno.EBADF
        with pytest.raises(TypeError, match="5 arguments"):
            _sockcalls.connect_inet(sock, fd, ("127.0.0.1", 80))  # type: ignore[call-arg]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # nothing was attempted


def test_the_c_helpers_epoll_ctl_registers_and_modifies_as_select_epoll_does() -> None:
    """ADD and MOD with the event's data being the descriptor (what `poll` reports), select.epoll's
    errors (EEXIST, ENOENT, EBADF), and no other operation."""
    if sockcalls.epoll_ctl is None:
        pytest.skip("epoll_ctl is the C helper's, on Linux")
    epoll_ctl = sockcalls.epoll_ctl
    add, modify = 1, 3
    with select.epoll() as epoll, socket_pair("tcp") as (a, b):
        epfd = epoll.fileno()
        epoll_ctl(epfd, add, a.fileno(), select.EPOLLIN | select.EPOLLET)
        assert epoll.poll(0) == []
        b.send(b"x")
        assert epoll.poll(10) == [(a.fileno(), select.EPOLLIN)]
        with pytest.raises(FileExistsError):
            epoll_ctl(epfd, add, a.fileno(), select.EPOLLIN)
        epoll_ctl(epfd, modify, a.fileno(), select.EPOLLIN | select.EPOLLOUT | (1 << 31))  # EPOLLET
        assert epoll.poll(10) == [(a.fileno(), select.EPOLLIN | select.EPOLLOUT)]  # as it is now
        with pytest.raises(FileNotFoundError):
            epoll_ctl(epfd, modify, b.fileno(), select.EPOLLIN)  # never added
        with pytest.raises(OSError) as raised:
            epoll_ctl(1_000_000, add, a.fileno(), select.EPOLLIN)
        assert raised.value.errno == errno.EBADF
        with pytest.raises(ValueError, match="EPOLL_CTL_ADD or EPOLL_CTL_MOD"):
            epoll_ctl(epfd, 2, a.fileno(), 0)  # EPOLL_CTL_DEL: not this function's
        with pytest.raises(ValueError, match="EPOLL_CTL_ADD or EPOLL_CTL_MOD"):
            epoll_ctl(epfd, 2**32 + 3, a.fileno(), 0)  # MOD only in its low 32 bits
        with pytest.raises(OverflowError):
            epoll_ctl(epfd, modify, a.fileno(), 1 << 32)
        with pytest.raises(OverflowError):
            epoll_ctl(epfd, modify, a.fileno(), -1)


def test_the_c_helpers_accept_gives_a_non_blocking_socket_and_the_peer_as_the_socket_module_does() -> None:
    if not sockcalls.BUILT or sockcalls.accept_inet is None:
        pytest.skip("accept_inet is the C helper's, on Linux")
    import fcntl

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        assert sockcalls.accept_inet(listener.fileno()) is None  # no client waiting: an answer
        with socket.create_connection(listener.getsockname()) as client:
            select.select([listener], [], [], 10)
            accepted = sockcalls.accept_inet(listener.fileno())
            assert accepted is not None
            fd, peer = accepted
            try:
                assert peer == client.getsockname()  # ("127.0.0.1", port), as accept() says it
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                assert flags & os.O_NONBLOCK
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            finally:
                os.close(fd)
        for host in ["127.0.0.1", "127.10.200.5", "127.255.255.254", "127.100.0.99"]:  # 1, 2, 3 digits
            with socket.socket() as client:
                client.bind((host, 0))
                client.connect(listener.getsockname())
                select.select([listener], [], [], 10)
                accepted = sockcalls.accept_inet(listener.fileno())
                assert accepted is not None
                fd, peer = accepted
                os.close(fd)
                assert peer == client.getsockname()
    closed = socket.socket()
    closed_fd = closed.detach()
    os.close(closed_fd)
    with pytest.raises(OSError) as raised:  # any error but EAGAIN raises as the socket module's
        sockcalls.accept_inet(closed_fd)
    assert raised.value.errno == errno.EBADF


def test_the_c_helpers_accept_refuses_an_ipv6_listener_without_leaking_the_client() -> None:
    if not sockcalls.BUILT or sockcalls.accept_inet is None:
        pytest.skip("accept_inet is the C helper's, on Linux")
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen(8)
        with socket.create_connection(listener.getsockname()[:2]):
            select.select([listener], [], [], 10)
            before = len(os.listdir("/proc/self/fd"))
            with pytest.raises(ValueError, match="not an IPv4 socket"):
                sockcalls.accept_inet(listener.fileno())
            assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("form", ["helper", "pure"])
def test_listen_backlog_counts_the_clients_waiting_and_refuses_other_sockets(form: str) -> None:
    if sockcalls.listen_backlog is None:
        pytest.skip("the backlog is counted on Linux only (TCP_INFO)")
    if form == "helper" and not sockcalls.BUILT:
        pytest.skip("the C helper is not built here")
    count = sockcalls.listen_backlog if form == "helper" else sockcalls._listen_backlog
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        assert count(listener, listener.fileno()) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        deadline = time.monotonic() + 30
        while count(listener, listener.fileno()) != 3:  # the handshake's last ACK lands in the queue
            assert time.monotonic() < deadline
            select.select([], [], [], 0.01)
        accepted, _ = listener.accept()
        assert count(listener, listener.fileno()) == 2
        for sock in [accepted, clients[0]]:  # connected TCP sockets: not listening
            assert count(sock, sock.fileno()) == -1
        for client in clients:
            client.close()
        accepted.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert count(udp, udp.fileno()) == -1
    closed = socket.socket()
    fd = closed.fileno()
    closed.close()
    assert count(closed, fd) == -1
