"""Shared test helpers: real loopback backends, a balancer in the test's nursery, waits."""

from __future__ import annotations

import errno
import gc
import os
import resource
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from hypothesis import settings

import trioanubis
from trioanubis import spawn
from trioanubis.app import Balancer
from trioanubis.config import Address, ListenerConfig, parse_config
from trioanubis.pool import Pool
from trioanubis.proxy.admission import Admission
from trioanubis.proxy.connection import Crew
from trioanubis.proxy.io import Readiness, resolve_io
from trioanubis.proxy.lifecycle import Connection, Limits, Origin
from trioanubis.proxy.relay import Relay
from trioanubis.proxy.sni_routes import RouteTable
from trioanubis.proxy.timeouts import Timer

if TYPE_CHECKING:
    from tests.helpers import LiveBalancer

# Hypothesis' per-example deadline (200 ms) is a timing assertion: on two shared cores an example
# that takes longer is not a bug. Profiles a test sets with @settings still inherit this.
settings.register_profile("anubis", deadline=None)
settings.load_profile("anubis")


# CI's run on the compiled build (.ci/run): the modules must be the compiled ones, and a wheel the
# tests build is the compiled one too (helpers.build_wheel).
COMPILED_RUN = os.environ.get("ANUBIS_EXPECT_COMPILED") == "1"


def pytest_report_header() -> str:
    return f"trioanubis: {'compiled with mypyc' if trioanubis.compiled() else 'pure Python'} (setup.py)"


def pytest_configure(config: pytest.Config) -> None:
    """`ANUBIS_EXPECT_COMPILED=1` (CI's compiled run): refuse to run the pure modules by mistake."""
    if COMPILED_RUN and not trioanubis.compiled():
        raise pytest.UsageError("ANUBIS_EXPECT_COMPILED=1, but trioanubis imports its pure-Python modules")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`@pytest.mark.pure_python` tests look inside the pure modules (frames, a method patched in a
    class): on the compiled build they would test nothing, so they skip there (the pure runs have them)."""
    if trioanubis.compiled():
        skip = pytest.mark.skip(reason="looks inside the pure-Python modules; the compiled build has none")
        for item in items:
            if item.get_closest_marker("pure_python"):
                item.add_marker(skip)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: at least 4 workers, since most tests wait on sockets and subprocesses, not the CPU.

    Counted from the CPUs this process may use (affinity, and a container's
    CPU quota), not the host's: 64 workers on a 2-CPU container would starve
    every test's deadlines.
    """
    return max(4, usable_cpus())


def usable_cpus() -> int:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    v1 = "/sys/fs/cgroup/cpu/cpu.cfs_"
    for path, period_path in (("/sys/fs/cgroup/cpu.max", ""), (v1 + "quota_us", v1 + "period_us")):
        try:
            fields = Path(path).read_text().split()
            quota = int(fields[0])
            period = int(fields[1]) if len(fields) > 1 else int(Path(period_path).read_text())
        except (OSError, ValueError, IndexError):
            continue  # no such cgroup file, or "max": no quota
        if quota > 0 and period > 0:
            count = min(count, max(1, -(-quota // period)))
    return count


# Deadline for "eventually": generous, since these machines are shared and noisy.
EVENTUALLY = 20.0
# The readiness backend this test run uses ("auto" unless ANUBIS_IO says otherwise:
# .ci/run runs the suite once per backend).
IO_BACKEND = resolve_io("auto")


async def wait_until(predicate: Callable[[], bool], timeout: float = EVENTUALLY) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    after = open_fds()
    assert after <= before, f"file descriptors leaked: {before} before, {after} after"


async def echo_handler(stream: trio.SocketStream) -> None:
    """Echo every byte; on EOF send EOF back (half-close preserved)."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


class Backend:
    """An in-process TCP server on 127.0.0.1:0 that counts its connections."""

    def __init__(self, handler: Callable[[trio.SocketStream], Awaitable[None]], name: str):
        self.handler = handler
        self.name = name
        self.connections = 0
        self.active = 0
        self.port = 0
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()  # its listener and connections closed (`stop`, then the task ran)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.active += 1
        try:
            await self.handler(stream)
        finally:
            self.active -= 1

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED, port: int = 0) -> None:
        try:
            with self.scope:
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started(self)
                await trio.serve_listeners(self._handle, listeners)
        finally:
            self.stopped.set()

    def stop(self) -> None:
        """Cancel the server; its listening socket closes when its task next runs (`stopped`): until
        then the kernel still completes handshakes to it, and resets them at the close."""
        self.scope.cancel()


async def start_backend(
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[None]] = echo_handler,
    name: str = "backend",
    port: int = 0,
) -> Backend:
    backend = Backend(handler, name)
    await nursery.start(lambda task_status: backend.run(task_status=task_status, port=port))
    return backend


def config_for(servers: list[Any], **pool: Any) -> dict[str, Any]:
    """A one-listener config dict on 127.0.0.1:0 balancing to `servers`."""
    health = pool.pop("health", {"check": "none"})
    listener = pool.pop("listener", {})
    settings = pool.pop("settings", {})
    return {
        "settings": settings,
        "listeners": {"test": {"bind": "127.0.0.1:0", "pool": "test", **listener}},
        "pools": {"test": {"servers": servers, "health": health, **pool}},
    }


@asynccontextmanager
async def running_balancer(
    data: Mapping[str, Any],
) -> AsyncIterator[tuple[Balancer, Address]]:
    """Run a Balancer for `data` in a nursery of its own; yield it and its first bound address."""
    config = parse_config(data, "test.toml")
    balancer = Balancer(config)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(balancer.run)
        yield balancer, next(iter(bound.values()))
        nursery.cancel_scope.cancel()


async def connect(address: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(address.host, address.port)


async def connect_when_listening(port: int, timeout: float = 30) -> trio.SocketStream:
    """Connect to 127.0.0.1:`port`, retrying while nothing listens there yet (a process starting)."""
    with trio.fail_after(timeout):
        while True:
            try:
                return await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)


async def receive_all(stream: trio.SocketStream, limit: int = 1 << 26) -> bytes:
    """Everything until EOF (raises if the peer resets)."""
    chunks = bytearray()
    while data := await stream.receive_some(65536):
        chunks += data
        assert len(chunks) <= limit
    return bytes(chunks)


async def request(address: Address, payload: bytes = b"ping") -> bytes:
    """Send `payload`, half-close, and return the whole answer."""
    stream = await connect(address)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await receive_all(stream)


async def closed_without_answer(address: Address) -> bool:
    """Connect and wait: True when the balancer closes (or resets) without a byte."""
    stream = await connect(address)
    async with stream:
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


def name_handler(name: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A backend that answers every connection with its name, after reading to EOF."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
            await stream.send_all(name.encode())
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    return handler


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0 so the peer gets a TCP reset."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def ending(stream: trio.SocketStream) -> str:
    """Read until the stream ends: "eof" for a clean FIN, "reset" when the peer reset it."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ConnectionResetError):
            return "reset"
        raise
    return "eof"


def count_tasks() -> int:
    """Every task in this Trio run, from the root down, but the idle connection tasks a listener
    keeps for its next clients (connection.py's `Crew`: no connection's, and bounded)."""

    def walk(task: trio.lowlevel.Task) -> int:
        mine = 0 if isinstance(task.custom_sleep_data, Crew) else 1
        return mine + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def awaited_frames(task: trio.lowlevel.Task) -> list[tuple[str, str]]:
    """The coroutines and generators a parked task is suspended in, outermost first: (qualified name, file).

    The object's `__qualname__`, not its code's `co_qualname` (Python 3.11 and later only).
    """
    frames = []
    awaiting: Any = task.coro
    while (code := getattr(awaiting, "cr_code", None) or getattr(awaiting, "gi_code", None)) is not None:
        frames.append((awaiting.__qualname__, code.co_filename))
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return frames


def _ports_of_this_worker() -> Iterator[int]:
    """Ports for this xdist worker alone, below the kernel's ephemeral range, in a cycle.

    A port the kernel picks (bind to port 0, connect) comes from the ephemeral range, so a free
    port taken from there can be handed to someone else between the test's probe and its bind:
    a replica's port, another worker's free port, a client's source port. Ports below that range,
    split between the workers, are given to nobody else.
    """
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = 32768  # Linux's default; BSD and macOS start theirs at 49152
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    span = (lowest_ephemeral - FIRST_TEST_PORT) // max(workers, 1)
    if span < 100:  # no room below the ephemeral range: let the kernel choose
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                yield int(s.getsockname()[1])
    block = range(FIRST_TEST_PORT + index * span, FIRST_TEST_PORT + (index + 1) * span)
    offset = os.getpid() % span  # a later run starts elsewhere in the block
    while True:
        for port in (*block[offset:], *block[:offset]):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))  # free now, and no TIME_WAIT left on it
                except OSError:
                    continue
            yield port


FIRST_TEST_PORT = 10000
_PORTS = _ports_of_this_worker()


def free_port() -> int:
    """A port nothing listens on, which nobody else will be given before the test binds it."""
    return next(_PORTS)


@contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """Use up every descriptor this process may open (RLIMIT_NOFILE lowered first); give them back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    held = []
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(autouse=True)
def _replicas_take_this_workers_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica the balancer spawns in this process gets a port of this xdist worker's own range
    (`free_port`). The product's choice, a bind to port 0 then closed, is one the kernel may give
    another worker's test in between; the balancer then sends clients to that test's listener (a CI
    run saw a replica exit with status 1 and a GET through the balancer reset)."""
    kernels_choice = spawn.free_port

    def ours(host: str) -> int:
        return free_port() if host == "127.0.0.1" else kernels_choice(host)

    monkeypatch.setattr(spawn, "free_port", ours)


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect after every test, so a socket a test leaves unclosed is reported against that test
    (as a ResourceWarning, an error here) rather than against whichever test the collector next runs in.

    What is still alive after that collection is frozen (moved where the collector no longer
    walks), so the next collection costs what the next test made rather than the whole heap:
    walking every object (~150,000 of them) after each test took 92 ms, 118 s of CPU per run.
    An object frozen here that later ends in a garbage cycle is never freed nor warned about;
    what a test makes and drops is.
    """
    yield
    gc.collect()
    gc.freeze()


class StubOrigin(Origin):
    """What a connection needs from a listener, for tests that drive a relay or the Timer alone."""

    def __init__(self, poller: Readiness, timer: Timer, pool: Pool, listener: ListenerConfig) -> None:
        self.name = "test"
        self.config = listener
        self.poller = poller
        self.timer = timer
        self.pool: Pool | None = pool
        self.pools = {pool.name: pool}
        self.routes = RouteTable(())
        self.tls_counts: dict[str, int] = {}
        self.limits = Limits(0)
        self.admission = Admission("test", listener)
        self.opening: tuple[Any, ...] = ()
        self.connections: trio.Nursery | None = None
        self.records: list[Any] = []
        self.on_record = self.records.append
        self.active = 0
        self.internal_errors = 0


def drive_frame(backend: Readiness) -> str:
    """The frame a driven relay's task waits in: epoll's `drive` returns its `_drive` (no frame of its
    own), the portable backend's is one."""
    return "_drive" if backend.caps.name == "epoll" else "drive"


def standalone_connection(
    poller: Readiness, client: socket.socket, *, idle: float = 600.0, half_close: float = 60.0,
    timer: Timer | None = None,
) -> Connection:  # fmt: skip
    """A `Connection` with no listener around it (its pool's timeouts as given)."""
    config = parse_config(config_for(["127.0.0.1:1"], idle_timeout=idle, half_close_timeout=half_close))
    pool = Pool(config.pools["test"], initially_healthy=True)
    origin = StubOrigin(poller, timer or Timer(), pool, config.listeners["test"])
    return Connection(origin, client, ("127.0.0.1", 1), pool)


def standalone_relay(
    poller: Readiness, client: socket.socket, server: socket.socket, **timeouts: float
) -> Relay:
    """A socket relay between `client` and `server` (connected already), its connection standalone."""
    conn = standalone_connection(poller, client, **timeouts)  # type: ignore[arg-type]
    conn.server_sock = server
    relay = Relay(conn, client, server, poller)
    conn.relay = relay
    return relay


def relays(balancer: Balancer) -> list[Any]:
    """The relays of the balancer's connections that are relaying now (the Timer watches them)."""
    return [conn.relay for conn in balancer.timer.connections if conn.relay is not None]


@asynccontextmanager
async def process_logging_to(
    command: list[str], log: Any, env: Mapping[str, str] | None = None
) -> AsyncIterator[trio.Process]:
    """Start `command` with stdout and stderr going to the file `log` (not a pipe: a process it
    starts, an upgrade's successor, may outlive it and write on, and nobody has to read); SIGTERM it
    at the end if it still runs, and wait for it."""
    with open(log, "ab") as out:
        process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=out, env=env)  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()


async def wait_for_log(log: Any, text: str, timeout: float = EVENTUALLY) -> str:
    """The file `log`'s content once it contains `text`."""
    with trio.fail_after(timeout):
        while text not in (content := Path(log).read_text(errors="replace")):
            await trio.sleep(0.02)
    return content


async def echo_round_trip(address: Address, payload: bytes) -> None:
    """Connect, send `payload`, read it back whole, close; raises if refused, reset or short."""
    async with await connect(address) as stream:
        await stream.send_all(payload)
        received = b""
        while len(received) < len(payload):
            data = await stream.receive_some(65536)
            if not data:
                raise AssertionError(f"echo ended after {len(received)} of {len(payload)} bytes")
            received += data
        assert received == payload


@pytest.fixture(scope="module")
def live_balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBalancer]:
    """`anubis run` with an admin endpoint and a token in front of `anubis hello`, for a module."""
    from tests.helpers import live_balancer_process

    with live_balancer_process(tmp_path_factory.mktemp("live")) as live:
        yield live


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once per module from the tracked files."""
    from tests.helpers import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source"))
