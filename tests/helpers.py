"""Helpers more than one test file uses: the CLI in a subprocess, the admin over HTTP, clients
from chosen addresses, peers, workers. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import strategies as st

from tests.conftest import (
    COMPILED_RUN,
    EVENTUALLY,
    config_for,
    connect,
    connect_when_listening,
    free_port,
)
from trioanubis.config import Address
from trioanubis.proxy.io import Readiness, epoll_available, open_readiness

BACKENDS = [
    pytest.param("epoll", marks=pytest.mark.skipif(not epoll_available(), reason="no epoll here")),
    "portable",
]


@asynccontextmanager
async def running(name: str) -> AsyncIterator[Readiness]:
    """A backend with its task running, stopped at the end."""
    backend = open_readiness(name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run)
            await trio.testing.wait_all_tasks_blocked()
            yield backend
            nursery.cancel_scope.cancel()
    finally:
        backend.shut_down()


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


TOKEN = "sesame"


def two_servers(a: str, b: str, token: str) -> dict[str, Any]:
    data = config_for([{"address": a, "name": "alpha"}, {"address": b, "name": "beta"}],
                      health={"check": "tcp", "interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1})
    data["admin"] = {"bind": "127.0.0.1:0", "token": token}
    return data  # fmt: skip


def write_config(path: Path, port: int, admin: int, servers: list[str], *, workers: int = 2,
                 health: str = 'check = "none"', pool: str = "", **settings: object) -> None:  # fmt: skip
    lines = ["[settings]", f"workers = {workers}", 'drain_timeout = "20s"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[admin]", f'bind = "127.0.0.1:{admin}"',
              "[listeners.web]", f'bind = "127.0.0.1:{port}"', 'pool = "web"',
              "[pools.web]", f"servers = {json.dumps(servers)}", pool,
              "[pools.web.health]", health]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


async def admin(port: int, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    """One admin request over HTTP/1.0: (status, body)."""
    stream = await connect_when_listening(port)
    async with stream:
        head = f"{method} {path} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        await stream.send_all(head + body)
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
    head_text, _, payload = answer.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), payload


async def stats(port: int) -> dict[str, Any]:
    status, body = await admin(port, "/stats")
    assert status == 200, body
    return dict(json.loads(body))


async def all_serving(port: int, count: int) -> dict[str, Any]:
    """/stats once every worker answers (after a start or a restart)."""
    with trio.fail_after(EVENTUALLY):
        while True:
            doc = await stats(port)
            workers = doc["workers"]
            if len(workers) == count and all(w["serving"] and w["answered"] for w in workers):
                return doc
            await trio.sleep(0.05)


@asynccontextmanager
async def supervisor(config: Path, *extra: str) -> AsyncIterator[trio.Process]:
    async with anubis("run", "-c", str(config), *extra) as process:
        yield process


@asynccontextmanager
async def peer_process(argv: list[str], port: int, log_path: Path) -> AsyncIterator[None]:
    """Run a peer until the block ends; wait until it accepts on 127.0.0.1:`port`."""
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(EVENTUALLY):
                while not await port_listening(port):
                    if process.poll() is not None:
                        pytest.fail(f"{argv[0]} exited: {log_path.read_text()}")
                    await trio.sleep(0.02)
            yield
        finally:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
            process.kill()


def real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The ClientHello Python's own ssl module sends."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@contextmanager
def blackholed_port() -> Iterator[int]:
    """A listening socket that never accepts and whose backlog is full: connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def connect_from(source: str, address: Address) -> trio.SocketStream:
    """A connection to `address` from the local address `source` (127.0.0.2 is loopback too)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect((address.host, address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(stream: trio.SocketStream, payload: bytes = b"ping") -> bytes | None:
    """Send, half-close, read to EOF: the echo, or None when the balancer closed or reset instead."""
    async with stream:
        try:
            await stream.send_all(payload)
            await stream.send_eof()
            answer = b""
            while data := await stream.receive_some(65536):
                answer += data
        except trio.BrokenResourceError:
            return None
        return answer or None


async def http(
    address: Address, method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with h11; (status, headers, body)."""
    conn = h11.Connection(h11.CLIENT)
    stream = await connect(address)
    async with stream:
        all_headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body))), *headers]
        data = conn.send(h11.Request(method=method, target=path, headers=all_headers))
        data += conn.send(h11.Data(data=body)) if body else b""
        await stream.send_all(data + conn.send(h11.EndOfMessage()))
        status, response_headers, payload = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, response_headers, payload


def admin_config(servers: list[Any], token: str = "", **pool: Any) -> dict[str, Any]:
    data = config_for(servers, **pool)
    data["admin"] = {"bind": "127.0.0.1:0", "token": token}
    return data


def blocking_exchange(port: int, data: bytes) -> bytes:
    """Send `data` then EOF, read to EOF; whatever the peer does, never raise."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=EVENTUALLY) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:  # reset, or closed while we were still sending
            pass
    return answer


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + EVENTUALLY
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


FUZZ_TOKEN = "fuzz-token"


@dataclass
class LiveBalancer:
    process: subprocess.Popen[bytes]
    port: int
    admin: int
    stderr: Path
    server: str = ""  # the address of its one server, "one"

    def admin_request(self, method: str, path: str, body: bytes = b"") -> bytes:
        head = (f"{method} {path} HTTP/1.1\r\nHost: [::1]\r\nAuthorization: Bearer {FUZZ_TOKEN}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
        return blocking_exchange(self.admin, head.encode() + body)


@contextmanager
def live_balancer_process(tmp: Path) -> Iterator[LiveBalancer]:
    """`anubis run` with an admin endpoint in front of `anubis hello`: real processes."""
    hello_port, port, admin = free_port(), free_port(), free_port()
    config = tmp / "anubis.toml"
    config.write_text(
        f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
        f'[pools.web]\nservers = [{{ address = "127.0.0.1:{hello_port}", name = "one" }}]\n'
        f'health = {{ check = "none" }}\n[admin]\nbind = "127.0.0.1:{admin}"\ntoken = "{FUZZ_TOKEN}"\n'
    )
    stderr = tmp / "stderr"
    with open(stderr, "wb") as log:
        hello_command = [*ANUBIS, "hello", "--name", "one", "--host", "127.0.0.1", "--port", str(hello_port)]
        hello = subprocess.Popen(hello_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = subprocess.Popen([*ANUBIS, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        for p in (hello_port, port, admin):
            wait_listening(p)
        yield LiveBalancer(process, port, admin, stderr, f"127.0.0.1:{hello_port}")
    finally:
        for child in (process, hello):
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
    assert process.returncode == 0, stderr.read_text()


async def wait_port(port: int) -> None:
    await (await connect_when_listening(port)).aclose()


ROOT = Path(__file__).resolve().parent.parent


ANUBIS = [sys.executable, "-m", "trioanubis"]


def run_cli(*args: str, memory: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run `anubis ARGS`; `memory` caps its address space, for inputs that once made it eat memory."""
    return subprocess.run([*ANUBIS, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          preexec_fn=None if memory is None else lambda: cap_memory(memory))  # fmt: skip


@asynccontextmanager
async def anubis(*args: str, cwd: Path = ROOT, command: Sequence[str] = tuple(ANUBIS),
                 env: Mapping[str, str] | None = None) -> AsyncIterator[trio.Process]:  # fmt: skip
    """Start `anubis ARGS` (`command` starts it: `python -m trioanubis` unless told), yield the
    process, SIGTERM it at the end and expect exit 0."""
    process = await trio.lowlevel.open_process(
        [*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert process.returncode == 0, await process_stderr(process)


async def http_get(port: int, path: str = "/", timeout: float = 30) -> bytes:
    """GET over plain TCP, retrying until the port answers (the process may still start)."""
    with trio.fail_after(timeout):
        while True:
            stream = await connect_when_listening(port, timeout)
            answer = b""
            async with stream:
                try:  # a balancer whose servers are not up yet closes us: ask again
                    await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    await stream.send_eof()
                    while data := await stream.receive_some(65536):
                        answer += data
                except trio.BrokenResourceError:
                    pass
            if answer:
                return answer
            await trio.sleep(0.05)


async def process_stderr(process: trio.Process) -> str:
    assert process.stderr is not None
    chunks = []
    with trio.move_on_after(5):
        while data := await process.stderr.receive_some():
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def cap_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


async def port_listening(port: int) -> bool:
    """Whether something listens on the port, read from /proc (connecting would make a connection)."""
    wanted = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = await trio.Path(table).read_text()
        if any(wanted in line and line.split()[3] == "0A" for line in text.splitlines()[1:]):
            return True
    return False


def tracked_files(under: str) -> list[str]:
    """Files git tracks (or would: untracked, not ignored) below `under`, as they are now."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", under or "."]
    listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def build_wheel(out: Path, source: Path, env: dict[str, str] | None = None) -> Path:
    """A wheel built from the tracked files only (copied to `source`): a stale build/ must not help.

    Pure Python (`ANUBIS_COMPILE=0`: a compiled build takes a minute of CPU), except in CI's run on
    the compiled build (`ANUBIS_EXPECT_COMPILED=1`), where the wheel is the compiled one; `env`
    adds to (or overrides) the build's environment.
    """
    for name in tracked_files(""):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)]
    env = {**os.environ, "ANUBIS_COMPILE": "required" if COMPILED_RUN else "0", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    [built] = out.glob("trioanubis-*.whl")
    return built


# What a hostile tool may write under the fleet's etcd prefix (tests/test_fleet*.py).
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4),
                    max_leaves=20)  # fmt: skip
ADDRESSES = st.sampled_from(["127.0.0.1:1", "x", 5, ""]) | JSON
SERVER_LIKE = st.fixed_dictionaries({}, optional={"address": ADDRESSES, "weight": JSON, "name": JSON,
                                                  "faults": JSON, "priority": JSON,
                                                  "backup": JSON})  # fmt: skip
COMMAND_LIKE = st.fixed_dictionaries({"op": st.sampled_from(["drain", "enable", "weight", "faults", "add",
                                                             "remove", "clear_faults"]) | JSON},
                                     optional={"pool": st.just("web") | JSON, "server": st.just("s1") | JSON,
                                               "weight": JSON, "faults": JSON})  # fmt: skip
VALUES = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) | SERVER_LIKE.map(
    lambda v: json.dumps(v).encode()) | COMMAND_LIKE.map(lambda v: json.dumps(v).encode())


class CuttableRelay:
    """A TCP relay to a local port that counts connections, can cut them all, and can refuse new
    ones (each closed at once) until told to relay again: a network between a client and its
    server (etcd) that a test breaks and mends."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.connections = 0
        self.active = 0
        self.refusing = False
        self._scopes: set[trio.CancelScope] = set()

    @classmethod
    async def start(cls, nursery: trio.Nursery, target: int) -> CuttableRelay:
        relay = cls(target)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, relay._handle, 0, host="127.0.0.1"))
        relay.port = listeners[0].socket.getsockname()[1]
        return relay

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            await client.aclose()
            return
        self.connections += 1
        self.active += 1
        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                server = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with server, client, trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(_pump, server, client, nursery.cancel_scope)
            self._scopes.discard(scope)
        finally:
            self.active -= 1


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()
