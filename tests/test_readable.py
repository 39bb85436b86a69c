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
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
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


def _fill(sock: socket.socket) -> None:
    while True:
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            return


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            if not sock.recv(1 << 20):
                return
        except BlockingIOError:
            return


async def _write(sock: socket.socket, woke: list[str]) -> None:
    await trio.lowlevel.wait_writable(sock)
    woke.append("writer")


async def _read(sock: socket.socket, path: str, woke: list[str]) -> None:
    await _wait_for(sock.fileno(), path).wait()
    woke.append("reader")


async def _cancelled(wait: Callable[[], Awaitable[object]]) -> bool:
    """`await wait()`, cancelled once every task is blocked: True when it was."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def cancel() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            nursery.start_soon(cancel)
            await wait()
    return scope.cancelled_caught


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
    _fill(a)  # a's send buffer full: its writer waits
    woke: list[str] = []

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, a, woke)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_read, a, path, woke)
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


@pytest.mark.parametrize("path", PATHS)
async def test_waits_again_after_notify_closing(path: str, pair: Pair) -> None:
    """Closed under the wait (parked on the table's path): notify_closing drops the entry (and the
    kernel's registration) without zeroing its current_flags; the next wait must still re-arm."""
    a, b = pair
    wait = await _prearmed(path, a, b)

    async def close_it() -> None:
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.notify_closing(a)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_it)
        with pytest.raises(trio.ClosedResourceError):
            await wait.wait()
    assert _registered(a.fileno()) is None
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await trio.testing.wait_all_tasks_blocked()
                b.send(b"again")

            nursery.start_soon(send)
            await wait.wait()


@pytest.mark.parametrize("path", PATHS)
async def test_waits_again_on_a_reused_number(path: str) -> None:
    """The descriptor closed under the wait and its number reused by a new socket: another task's
    wait_writable finds the closed fd and wakes the reader with an error (Trio's wake_all); the next
    wait on the same number must arm the new socket."""
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()
    wait = _wait_for(fd, path)
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await wait.wait()
        except OSError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        a.close()  # behind Trio's back
        with pytest.raises(OSError):
            await trio.lowlevel.wait_writable(fd)  # Trio's wake_all wakes the reader too
    assert errors and _registered(fd) is None
    b.close()
    c, d = socket.socketpair()
    with c, d:
        if c.fileno() != fd:
            c, d = d, c
        assert c.fileno() == fd, "the number was not reused"
        c.setblocking(False)
        d.send(b"new")
        with trio.fail_after(5):
            await wait.wait()


@pytest.mark.parametrize("path", PATHS)
async def test_hang_up_wakes_both_reader_and_writer(path: str, pair: Pair) -> None:
    a, b = pair
    _fill(a)
    woke: list[str] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read, a, path, woke)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_write, a, woke)
            await trio.testing.wait_all_tasks_blocked()
            b.close()
    assert sorted(woke) == ["reader", "writer"]
    assert _registered(a.fileno()) is None


@pytest.mark.parametrize("path", PATHS)
async def test_reader_cancelled_beside_a_writer_then_both_wait_again(path: str, pair: Pair) -> None:
    a, b = pair
    _fill(a)
    wait = _wait_for(a.fileno(), path)
    woke: list[str] = []

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, a, woke)
            await trio.testing.wait_all_tasks_blocked()
            assert await _cancelled(wait.wait)
            entry: Any = _registered(a.fileno())
            if entry is not None:  # the table's path: the writer's alone, armed for writing only
                assert entry.read_task is None and entry.write_task is not None
                assert entry.current_flags == 4  # EPOLLOUT
            b.send(b"r")
            await wait.wait()
            woke.append("reader")
            _drain(b)
    assert woke == ["reader", "writer"]


@pytest.mark.parametrize("path", PATHS)
async def test_writer_cancelled_beside_the_reader(path: str, pair: Pair) -> None:
    a, b = pair
    _fill(a)
    wait = _wait_for(a.fileno(), path)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                assert await _cancelled(partial(trio.lowlevel.wait_writable, a))
                await trio.testing.wait_all_tasks_blocked()
                entry: Any = _registered(a.fileno())
                if entry is not None:
                    assert entry.write_task is None and entry.read_task is not None
                    assert entry.current_flags == 1  # EPOLLIN
                b.send(b"r")

            nursery.start_soon(write)
            await wait.wait()


async def _scenario(path: str, seed: int, steps: int) -> list[object]:
    """Random interleaving of a reader (the path under test) and Trio's writer on one socket, each
    step settled (all tasks blocked, no I/O pending): what each step shows (who woke, how; Trio's
    table entry and statistics) is a deterministic trace to compare between the two paths."""
    rng = random.Random(seed)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    trace: list[object] = []
    with a, b:
        fd = a.fileno()
        scopes: dict[str, trio.CancelScope | None] = {"reader": None, "writer": None}
        go = {"reader": trio.Event(), "writer": trio.Event()}

        async def loop(name: str) -> None:
            wait = _wait_for(fd, path)  # made in the task that awaits it
            while True:
                await go[name].wait()
                go[name] = trio.Event()
                with trio.CancelScope() as scope:
                    scopes[name] = scope
                    try:
                        if name == "reader":
                            await wait.wait()
                        else:
                            await trio.lowlevel.wait_writable(fd)
                        trace.append((name, "woke"))
                    except trio.ClosedResourceError:
                        trace.append((name, "closed"))
                    except trio.BusyResourceError:
                        trace.append((name, "busy"))
                    scopes[name] = None
                if scope.cancelled_caught:
                    trace.append((name, "cancelled"))

        base = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop, "reader")
            nursery.start_soon(loop, "writer")
            ops = ["send", "drain_a", "fill_a", "drain_b", "cancel_r", "cancel_w", "close", "go_r", "go_w"]
            for _ in range(steps):
                op = rng.choice([*ops, "go_r", "go_w"])
                mark = len(trace)
                if op == "send":
                    b.send(b"s")
                elif op == "drain_a":
                    _drain(a)
                elif op == "fill_a":
                    _fill(a)
                elif op == "drain_b":
                    _drain(b)
                elif op in ("cancel_r", "cancel_w"):
                    scope = scopes["reader" if op == "cancel_r" else "writer"]
                    if scope is not None:
                        scope.cancel()
                elif op == "close":
                    trio.lowlevel.notify_closing(fd)
                else:
                    go["reader" if op == "go_r" else "writer"].set()
                await trio.testing.wait_all_tasks_blocked()
                await trio.testing.wait_all_tasks_blocked()
                woken_now = list(trace[mark:])
                del trace[mark:]
                trace.extend(sorted(woken_now))  # Trio runs a batch of woken tasks in random order
                entry: Any = _registered(fd)
                stats = trio.lowlevel.current_statistics().io_statistics
                state = (
                    None
                    if entry is None
                    else (entry.read_task is not None, entry.write_task is not None, entry.current_flags)
                )
                trace.append((op, state, stats.tasks_waiting_read - base, stats.tasks_waiting_write))
            nursery.cancel_scope.cancel()
    return trace


@pytest.mark.parametrize("seed", range(6))
async def test_random_interleavings_answer_as_trio(seed: int) -> None:
    """The same steps, the same trace: who woke and how, Trio's table entry and statistics."""
    assert await _scenario("table", seed, 80) == await _scenario("trio", seed, 80)


# A descriptor Trio's epoll has never held sends the first wait through Trio's own function (its
# registration fails with ENOENT): the tests below wait once first, so that the table's path parks.

_EPOLLIN, _EPOLLOUT = 1, 4


async def _await(wait: Any) -> None:
    await wait.wait()


async def _prearmed(path: str, a: socket.socket, b: socket.socket) -> Any:
    """A wait that has completed once, so that the next one takes the table's path."""
    wait = _wait_for(a.fileno(), path)
    b.send(b"0")
    await wait.wait()
    a.recv(10)
    return wait


@pytest.mark.parametrize("path", PATHS)
async def test_cancelled_on_the_tables_path_then_woken_again(path: str, pair: Pair) -> None:
    """The table's own abort: out of the table, disarmed, and waited on again by anyone."""
    a, b = pair
    wait = await _prearmed(path, a, b)
    others = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read
    with trio.fail_after(5):
        assert await _cancelled(wait.wait)
    assert _registered(a.fileno()) is None
    assert trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read == others
    b.send(b"y")
    await trio.testing.wait_all_tasks_blocked()  # Trio polls its epoll: an event still armed goes to nobody
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(a)
        await wait.wait()


@pytest.mark.parametrize("path", PATHS)
async def test_writer_woken_while_the_reader_still_waits(path: str, pair: Pair) -> None:
    """Re-armed for both when a writer is in the entry: the writer wakes while the reader waits."""
    a, b = pair
    wait = await _prearmed(path, a, b)  # this task is the reader
    _fill(a)
    woke: list[str] = []

    async def drive() -> None:
        await trio.testing.wait_all_tasks_blocked()
        entry: Any = _registered(a.fileno())
        assert entry.read_task is not None and entry.write_task is not None
        assert entry.current_flags == _EPOLLIN | _EPOLLOUT
        _drain(b)  # writable: the writer must wake while the reader still waits
        while not woke:  # a socketpair's: writable at once; Trio polls when every task is blocked
            await trio.testing.wait_all_tasks_blocked()
        b.send(b"r")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, a, woke)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(drive)
            await wait.wait()
            woke.append("reader")
    assert woke == ["writer", "reader"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_second_reader_refused_while_the_tables_reader_is_parked(path: str, pair: Pair) -> None:
    """The table's reader parked, another task's waits are refused and leave its entry alone."""
    a, b = pair
    wait = await _prearmed(path, a, b)
    refused: list[str] = []

    async def intruder() -> None:
        await trio.testing.wait_all_tasks_blocked()
        entry: Any = _registered(a.fileno())
        reader = entry.read_task
        with pytest.raises(trio.BusyResourceError):
            await trio.lowlevel.wait_readable(a)
        refused.append("trio")
        with pytest.raises(trio.BusyResourceError):
            await _wait_for(a.fileno(), path).wait()
        refused.append("another")
        assert _registered(a.fileno()) is entry and entry.read_task is reader
        b.send(b"z")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(intruder)
            await wait.wait()
    assert refused == ["trio", "another"]


def test_a_newer_trio_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trio's table is private: a Trio newer than PARKED_TRIO gets Trio's own wait."""

    async def main() -> object:
        return readable.trio_epoll()

    assert trio.run(main) is not None or pytest.skip("no checked epoll here")
    monkeypatch.setattr(trio, "__version__", "0.36.0")
    assert trio.run(main) is None


async def test_made_in_one_task_awaited_in_another(pair: Pair) -> None:
    """The table would name the task that made the wait: awaited elsewhere, it is Trio's own wait."""
    a, b = pair
    wait = await _prearmed("table", a, b)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_await, wait)  # parks the child, as Trio's wait would
            await trio.testing.wait_all_tasks_blocked()
            entry: Any = _registered(a.fileno())
            assert entry.read_task is not trio.lowlevel.current_task()
            b.send(b"2")
    with trio.fail_after(5):
        await wait.wait()  # and its own task's wait is the table's again
    assert a.recv(10) == b"2"


def test_every_module_using_it_is_compiled() -> None:
    """A Python caller could take a KeyboardInterrupt between `wait()` and its await (see readable.py)."""
    import ast
    import pathlib

    root = pathlib.Path(readable.__file__).resolve().parents[3]
    setup = ast.parse((root / "setup.py").read_text())
    assigned = [node for node in ast.walk(setup) if isinstance(node, ast.Assign)]
    compiled = next(node.value for node in assigned
                    if any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets))  # fmt: skip
    modules = set(ast.literal_eval(compiled))
    users = {str(path.relative_to(root)) for path in (root / "trioanubis").rglob("*.py")
             if "ReadableWait" in path.read_text() and path.name != "readable.py"}  # fmt: skip
    assert users == {"trioanubis/proxy/io/epoll.py", "trioanubis/proxy/listener.py"}
    assert users <= modules and "trioanubis/proxy/io/readable.py" in modules
