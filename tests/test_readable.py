"""One task's repeated wait for a readable descriptor (readable.py): it answers as Trio's own wait.

Each test runs on both paths: Trio's function (`trio.lowlevel.wait_readable`,
what the pure build and any unchecked Trio use) and the path that writes
Trio's epoll table itself, forced here in any build where Trio's epoll
manager is the checked one; the compiled run must use it on its own.
Woken again and again, cancelled, closed under it, beside a writer of the
same descriptor, raced by a second reader, on a descriptor Trio's epoll has
never held and on one already closed: each as Trio's wait behaves.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import COMPILED_RUN
from trioanubis.proxy.io import readable, woken
from trioanubis.proxy.io.readable import ReadableWait


def _fast() -> Any:
    io = readable.trio_epoll()
    if io is None:
        pytest.skip("Trio's epoll manager, as checked, is Linux's with Trio <= PARKED_TRIO")
    return io


PATHS = ["trio", "table"]


class _TrioWait:
    """Trio's own function, as the slow path calls it: what the table's path must answer like."""

    fast = False

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def wait(self) -> Awaitable[object]:
        return trio.lowlevel.wait_readable(self.fd)


def _wait_for(fd: int, path: str) -> ReadableWait | _TrioWait:
    return _TrioWait(fd) if path == "trio" else ReadableWait(fd, trio_io=_fast())


Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


def _registered(fd: int) -> object:
    io = readable.trio_epoll()
    return None if io is None else io._registered.get(fd)


def test_the_compiled_build_waits_in_the_table_with_a_trio_it_was_checked_against() -> None:
    if not COMPILED_RUN:
        pytest.skip("only the compiled build (ANUBIS_EXPECT_COMPILED=1) must take the table's path")
    assert readable.COMPILED

    async def main() -> bool:
        return ReadableWait(0).fast

    checked = woken.trio_version(trio.__version__) <= woken.PARKED_TRIO and woken.PARKED_IN_C
    assert trio.run(main) is checked


@pytest.mark.parametrize("path", PATHS)
async def test_woken_each_time_bytes_arrive(path: str, pair: Pair) -> None:
    a, b = pair
    wait = _wait_for(a.fileno(), path)
    assert wait.fast is (path == "table")
    for i in range(20):
        async with trio.open_nursery() as nursery:

            async def send(i: int = i) -> None:
                await trio.testing.wait_all_tasks_blocked()
                assert trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read >= 1
                b.send(bytes([i]))

            nursery.start_soon(send)
            await wait.wait()
        assert a.recv(10) == bytes([i])
    # Woken, the entry is gone from Trio's table (as after Trio's wait) and the descriptor disarmed.
    assert _registered(a.fileno()) is None


@pytest.mark.parametrize("path", PATHS)
async def test_a_wait_already_readable_returns_at_once(path: str, pair: Pair) -> None:
    a, b = pair
    b.send(b"x")
    wait = _wait_for(a.fileno(), path)
    with trio.fail_after(10):
        for _ in range(3):
            await wait.wait()  # level: still readable each time


@pytest.mark.parametrize("path", PATHS)
async def test_cancelled_then_waited_on_again_by_anyone(path: str, pair: Pair) -> None:
    a, b = pair
    wait = _wait_for(a.fileno(), path)
    others = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read
    with trio.move_on_after(0.01) as scope:
        await wait.wait()
    assert scope.cancelled_caught
    assert _registered(a.fileno()) is None  # left the table on its abort
    assert trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read == others
    b.send(b"y")
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(a)  # nobody else is counted as its reader
        await wait.wait()  # and this one waits again


@pytest.mark.parametrize("path", PATHS)
async def test_closed_under_the_wait(path: str, pair: Pair) -> None:
    a, _ = pair
    wait = _wait_for(a.fileno(), path)

    async def close_it() -> None:
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.notify_closing(a)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_it)
        with pytest.raises(trio.ClosedResourceError):
            await wait.wait()


@pytest.mark.parametrize("path", PATHS)
async def test_a_second_reader_is_refused_as_trio_refuses_it(path: str, pair: Pair) -> None:
    a, b = pair
    wait = _wait_for(a.fileno(), path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await trio.lowlevel.wait_readable(a)
        with pytest.raises(trio.BusyResourceError):
            await _wait_for(a.fileno(), path).wait()
        b.send(b"z")  # the first still wakes


@pytest.mark.parametrize("path", PATHS)
async def test_beside_a_writer_of_the_same_descriptor(path: str, pair: Pair) -> None:
    a, b = pair
    while True:  # fill a's send buffer so that its writer waits
        try:
            a.send(b"x" * 65536)
        except BlockingIOError:
            break
    woke: list[str] = []

    async def write() -> None:
        await trio.lowlevel.wait_writable(a)
        woke.append("writer")

    async def read() -> None:
        await _wait_for(a.fileno(), path).wait()
        woke.append("reader")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            b.send(b"r")  # readable: the reader wakes, the writer still waits
            while "reader" not in woke:
                await trio.sleep(0)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == ["reader"]
            while True:  # drain b: a becomes writable
                try:
                    b.recv(1 << 20)
                except BlockingIOError:
                    break
    assert woke == ["reader", "writer"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_descriptor_new_to_trio_and_one_already_closed(path: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        wait = _wait_for(a.fileno(), path)  # never waited on: not in Trio's epoll yet
        b.send(b"n")
        with trio.fail_after(10):
            await wait.wait()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a number nothing holds
    gone = _wait_for(fd, path)
    with pytest.raises(OSError):
        await gone.wait()
    assert _registered(fd) is None


async def test_the_pure_build_waits_with_trios_function(pair: Pair) -> None:
    """Pure Python may run a KeyboardInterrupt between taking the table's place and parking."""
    if readable.COMPILED:
        pytest.skip("the compiled build")
    a, b = pair
    wait = ReadableWait(a.fileno())
    assert not wait.fast
    b.send(b"p")
    with trio.fail_after(10):
        await wait.wait()
