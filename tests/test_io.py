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
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

from trioanubis.config import parse_config
from trioanubis.errors import AttemptCancelled, ConfigError
from trioanubis.proxy.io import IO_CHOICES, Readiness, epoll_available, open_readiness

BACKENDS = [
    pytest.param("epoll", marks=pytest.mark.skipif(not epoll_available(), reason="no epoll here")),
    "portable",
]
KINDS = ["socketpair", "tcp"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def running(name: str) -> AsyncIterator[Readiness]:
    """A backend with its task running, stopped at the end."""
    backend = open_readiness(name)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run)
        await trio.testing.wait_all_tasks_blocked()
        yield backend
        nursery.cancel_scope.cancel()


@contextmanager
def socket_pair(kind: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected non-blocking sockets: a socketpair, or a loopback TCP connection."""
    if kind == "socketpair":
        a, b = socket.socketpair()
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            b = socket.create_connection(listener.getsockname())
            a, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def fill(sock: socket.socket) -> None:
    """Send until the kernel's buffers are full (EAGAIN)."""
    chunk = b"x" * 65536
    while True:
        try:
            sock.send(chunk)
        except BlockingIOError:
            return


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
            if backend.name == "epoll":
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
            if backend.name == "epoll":
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
                    elif kind == "stepped read":
                        await backend.wait_readable(a.fileno(), Counting(a, wake_at=1))
                    else:
                        await backend.wait_writable(a.fileno())
                except trio.ClosedResourceError as exc:
                    errors.append(type(exc))

            for reader in ("read", "stepped read"):
                errors.clear()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait, reader)
                    nursery.start_soon(wait, "write")
                    await trio.testing.wait_all_tasks_blocked()
                    assert not errors
                    backend.forget(a.fileno())
                assert errors == [trio.ClosedResourceError, trio.ClosedResourceError], reader
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


class Counting:
    """A stepper that reads what is there and wakes its task once `wake_at` bytes arrived."""

    def __init__(self, sock: socket.socket, wake_at: int) -> None:
        self.sock = sock
        self.wake_at = wake_at
        self.got = 0
        self.steps = 0

    def step(self, fd: int) -> int | None:
        self.steps += 1
        self.got += len(drain(self.sock))
        return self.got if self.got >= self.wake_at else None


async def test_steps_keep_the_task_parked_until_one_returns_a_result(backend_name: str) -> None:
    with socket_pair("tcp") as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            stepper = Counting(a, wake_at=3)
            result: list[int] = []

            async def pump() -> None:
                result.append(await backend.wait_readable(a.fileno(), stepper))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                for sent in (1, 2):
                    await trio.testing.wait_all_tasks_blocked()
                    b.send(b"x")
                    with trio.fail_after(10):
                        while stepper.got < sent:
                            await trio.testing.wait_all_tasks_blocked(0.01)
                    assert not result  # each step stayed short of a result: still parked
                b.send(b"x")
            assert result == [3]
            assert stepper.steps >= 3


class Raising:
    def step(self, fd: int) -> int | None:
        raise RuntimeError("a bug in a step")


async def test_a_step_that_raises_ends_only_its_own_task(backend_name: str) -> None:
    with socket_pair("tcp") as (a, b), socket_pair("tcp") as (c, d):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            backend.register(c.fileno())
            raised: list[BaseException] = []

            async def buggy() -> None:
                try:
                    await backend.wait_readable(a.fileno(), Raising())
                except RuntimeError as exc:
                    raised.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(buggy)
                await trio.testing.wait_all_tasks_blocked()
                b.send(b"boom")
                with trio.fail_after(10):
                    while not raised:
                        await trio.testing.wait_all_tasks_blocked(0.01)
            assert str(raised[0]) == "a bug in a step"
            # The backend still serves everyone else.
            d.send(b"fine")
            with trio.fail_after(10):
                await backend.wait_readable(c.fileno(), Counting(c, wake_at=4))


async def test_a_step_that_cancels_its_own_relay_ends_in_cancellation(backend_name: str) -> None:
    with socket_pair("tcp") as (a, b):
        async with running(backend_name) as backend:
            backend.register(a.fileno())
            scope = trio.CancelScope()

            class Cancelling:
                def step(self, fd: int) -> int | None:
                    drain(a)
                    scope.cancel()  # the relay ends (a reset seen by the step)
                    return 4  # and the step has a result for the task too: cancellation wins

            after: list[str] = []
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:

                    async def pump() -> None:
                        with scope:
                            await backend.wait_readable(a.fileno(), Cancelling())
                            await trio.lowlevel.checkpoint()
                            after.append("ran on")  # must not happen

                    nursery.start_soon(pump)
                    await trio.testing.wait_all_tasks_blocked()
                    b.send(b"x")
            assert scope.cancelled_caught
            assert not after
            # The socket is free again for the next waiter.
            b.send(b"y")
            with trio.fail_after(10):
                await backend.wait_readable(a.fileno())


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
