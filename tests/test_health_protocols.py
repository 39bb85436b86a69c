"""Protocol health checks against real servers: redis-server, PostgreSQL, and stand-ins.

PostgreSQL is started in the test: `initdb` and `pg_ctl` on a temporary data
directory and a loopback port. Both refuse to run as root, so when the tests
run as root (CI does) they run as the `postgres` user through `runuser`, with
the directory handed to that user.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    Backend,
    config_for,
    connect,
    connect_when_listening,
    free_port,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.peers import need
from trioanubis.config import parse_config
from trioanubis.pool import Server

LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"


def fast(check: str, **keys: Any) -> dict[str, Any]:
    return {"check": check, "interval": "100ms", "timeout": "2s", "rise": 1, "fall": 1, **keys}


def replying(reply: bytes, *, read_first: bool = True) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A stand-in that answers every connection with `reply` and then keeps it open, as servers do."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if read_first:
                    await stream.receive_some(4096)
                await stream.send_all(reply)
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass

    return handler


@asynccontextmanager
async def redis_server(port: int) -> AsyncIterator[trio.Process]:
    command = [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
    process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL)
    try:
        (await connect_when_listening(port)).socket.close()
        yield process
    finally:
        process.terminate()
        with trio.fail_after(20):
            await process.wait()


def down_reasons(caplog: pytest.LogCaptureFixture, server: Server) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"server {server.name} is down" in r.getMessage()]


@pytest.mark.slow
async def test_redis_check_passes_on_real_redis_and_fails_on_loading(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("trioanubis").propagate = True
    port = free_port()
    async with redis_server(port) as redis:
        data = config_for([f"127.0.0.1:{port}"], health=fast("redis"))
        async with running_balancer(data) as (balancer, _):
            server = balancer.pools["test"].servers[0]
            assert server.healthy and server.last_check == "got '+PONG'"
            # the same port, now served by a Redis still loading its dataset
            redis.terminate()
            await redis.wait()
            await start_on(nursery, port, replying(LOADING))
            await wait_until(lambda: not server.healthy)
            await wait_until(lambda: "LOADING" in server.last_check)
    assert server.last_check == f"failed: expected '+PONG', got '{LOADING.decode().strip()}'"
    reasons = down_reasons(caplog, server)
    assert len(reasons) == 1  # logged once, with what the server said, or what the switch-over did:
    # refused (nothing listened), or closed without an answer (a probe Redis took as it stopped)
    assert any(seen in reasons[0] for seen in ("LOADING", "refused", "closed, got nothing")), reasons


async def start_on(
    nursery: trio.Nursery, port: int, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> Backend:
    """A stand-in on `port`, as soon as the process that had it let go."""
    with trio.fail_after(20):
        while True:
            try:
                return await start_backend(nursery, handler, port=port)
            except OSError:
                await trio.sleep(0.05)


async def test_redis_check_on_stand_ins(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("trioanubis").propagate = True
    loading = await start_backend(nursery, replying(LOADING))
    error = await start_backend(nursery, replying(b"-ERR unknown command\r\n"))
    pong = await start_backend(nursery, replying(b"+PONG\r\n"))
    data = config_for([loading.address, error.address, pong.address], health=fast("redis"))
    async with running_balancer(data) as (balancer, _):
        servers = balancer.pools["test"].servers
        states = [(s.healthy, s.last_check) for s in servers]
        assert down_reasons(caplog, servers[0]) == [
            f"pool test: server {servers[0].name} is down (expected '+PONG', got "
            "'-LOADING Redis is loading the dataset in memory')"]  # fmt: skip
    assert states == [
        (False, "failed: expected '+PONG', got '-LOADING Redis is loading the dataset in memory'"),
        (False, "failed: expected '+PONG', got '-ERR unknown command'"),
        (True, "got '+PONG'"),
    ]


# ------------------------------------------------------------------ PostgreSQL


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:`port`, run as the `postgres` user under root."""

    def __init__(self) -> None:
        self.pg_ctl = need("pg_ctl")
        self.bin = Path(self.pg_ctl).parent
        self.root = Path(tempfile.mkdtemp(prefix="anubis-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            self.as_user = [need("runuser"), "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    def command(self, *args: str) -> list[str]:
        return [*self.as_user, *args]

    def initdb(self) -> None:
        subprocess.run(self.command(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                                    "-U", "postgres", "--no-sync", "--no-locale", "-E", "UTF8"),
                       check=True, capture_output=True, timeout=120)  # fmt: skip

    def ctl(self, action: str) -> list[str]:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        return self.command(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                            "-t", "120", "-m", "fast", "-o", options, action)  # fmt: skip

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.initdb()
        subprocess.run(server.ctl("start"), check=True, capture_output=True, timeout=150)
        yield server
    finally:
        subprocess.run(server.ctl("stop"), capture_output=True, timeout=150)
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.mark.slow
async def test_postgres_check_passes_on_real_postgres_and_fails_when_stopped(postgres: Postgres) -> None:
    data = config_for([f"127.0.0.1:{postgres.port}"], health=fast("postgres"))
    async with running_balancer(data) as (balancer, _):
        server = balancer.pools["test"].servers[0]
        assert server.healthy, f"{server.last_check}\n{postgres.log()}"
        assert server.last_check == "ready for query"
        await trio.run_process(postgres.ctl("stop"), capture_stdout=True, capture_stderr=True)
        try:
            await wait_until(lambda: not server.healthy)
            # A check during the shutdown may fail otherwise (57P03 "shutting down", a reset);
            # once stopped, every one is refused.
            await wait_until(lambda: server.last_check == "failed: refused")
        finally:
            await trio.run_process(postgres.ctl("start"), capture_stdout=True, capture_stderr=True)
        await wait_until(lambda: server.healthy)


async def test_postgres_check_fails_when_the_role_is_refused(postgres: Postgres) -> None:
    data = config_for([f"127.0.0.1:{postgres.port}"], health=fast("postgres", user="no_such_role"))
    async with running_balancer(data) as (balancer, _):
        server = balancer.pools["test"].servers[0]
        assert not server.healthy
        assert server.last_check == ('failed: postgres refused the startup: 28000 role "no_such_role" '
                                     "does not exist")  # fmt: skip


# ------------------------------------------------------------------ server-first stand-ins


async def test_smtp_check_wants_a_220_banner(nursery: trio.Nursery) -> None:
    ready = await start_backend(nursery, replying(b"220 mail.test ESMTP ready\r\n", read_first=False))
    refusing = await start_backend(nursery, replying(b"554 5.3.2 no service here\r\n", read_first=False))
    data = config_for([ready.address, refusing.address], health=fast("smtp"))
    async with running_balancer(data) as (balancer, _):
        states = [(s.healthy, s.last_check) for s in balancer.pools["test"].servers]
    assert states == [(True, "got '220 mail.test ESMTP ready'"),
                      (False, "failed: expected '220', got '554 5.3.2 no service here'")]  # fmt: skip


async def test_banner_and_mysql_checks_read_what_the_server_says_first(nursery: trio.Nursery) -> None:
    ssh = await start_backend(nursery, replying(b"SSH-2.0-OpenSSH_9.6\r\n", read_first=False))
    data = config_for([ssh.address], health=fast("banner", expect_regex="^SSH-2\\.0-"))
    async with running_balancer(data) as (balancer, _):
        assert balancer.pools["test"].servers[0].last_check == "got 'SSH-2.0-'"
    handshake = b"\x0a8.0.36\x00\x01\x00\x00\x00abcdefgh\x00"
    mysql = await start_backend(nursery, replying(len(handshake).to_bytes(3, "little") + b"\x00" + handshake,
                                                  read_first=False))  # fmt: skip
    full = b"\xff\x10\x04Too many connections"
    busy = await start_backend(nursery, replying(len(full).to_bytes(3, "little") + b"\x00" + full,
                                                 read_first=False))  # fmt: skip
    data = config_for([mysql.address, busy.address], health=fast("mysql"))
    async with running_balancer(data) as (balancer, _):
        states = [(s.healthy, s.last_check) for s in balancer.pools["test"].servers]
    assert states == [(True, "mysql handshake, server '8.0.36'"),
                      (False, "failed: mysql refused: 1040 Too many connections")]  # fmt: skip


@pytest.mark.slow
async def test_a_silent_server_fails_at_the_timeout_and_a_flood_at_the_bound(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async def flood(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.send_all(b"x" * 65536)
            except trio.BrokenResourceError:
                pass

    quiet = await start_backend(nursery, silent)
    noisy = await start_backend(nursery, flood)
    health = fast("send_expect", send="PING\\r\\n", expect="+PONG", expect_bytes=100, timeout="300ms")
    async with running_balancer(config_for([quiet.address, noisy.address], health=health)) as (balancer, _):
        states = [s.last_check for s in balancer.pools["test"].servers]
    assert states == ["failed: timeout: expected '+PONG', got nothing",
                      f"failed: expected '+PONG' within 100 bytes, got '{'x' * 60}…'"]  # fmt: skip


# ------------------------------------------------------------------ attacker's replies, reloads

KINDS: dict[str, dict[str, Any]] = {
    "redis": {},
    "postgres": {},
    "mysql": {},
    "smtp": {},
    "banner": {"expect_regex": "^220 (a|b)*c"},
    "send_expect": {"send": "\\x00PING\\r\\n", "expect": "+PONG", "expect_bytes": 64},
}


def every_check(fuzzed: str, echo: str) -> dict[str, Any]:
    """One listener and pool per protocol check kind, each over the fuzzed server and an echo server."""
    health = {"interval": "20ms", "timeout": "200ms", "rise": 1, "fall": 1}
    return {
        "listeners": {kind: {"bind": "127.0.0.1:0", "pool": kind} for kind in KINDS},
        "pools": {
            kind: {"servers": [fuzzed, echo], "health": {"check": kind, **health, **keys}}
            for kind, keys in KINDS.items()
        },
    }


def cycling(replies: list[bytes], hold: bool) -> Callable[[trio.SocketStream], Awaitable[None]]:
    served = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal served
        reply = replies[served % len(replies)]
        served += 1
        async with stream:
            try:
                await stream.send_all(reply)
                if hold:
                    await trio.sleep_forever()
            except trio.BrokenResourceError:
                pass

    return handler


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.booleans())
async def test_random_server_replies_never_disturb_the_balancer(replies: list[bytes], hold: bool) -> None:
    async with trio.open_nursery() as nursery:
        fuzzed = await start_backend(nursery, cycling(replies, hold))
        echo = await start_backend(nursery, replying(b"", read_first=False))
        async with running_balancer(every_check(fuzzed.address, echo.address)) as (balancer, _):
            servers = [pool.servers[0] for pool in balancer.pools.values()]
            await wait_until(lambda: all(s.checks_passed + s.checks_failed > len(replies) for s in servers))
            for server in servers:
                assert server.last_check.isprintable() and len(server.last_check) < 300
            # still serving: every listener still accepts and relays
            for listener in balancer.listeners.values():
                assert listener.bound is not None
                stream = await connect(listener.bound)
                await stream.send_all(b"x")
                await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_every_protocol_check_runs_and_reloads(nursery: trio.Nursery) -> None:
    """Whatever `anubis check` accepts here starts, and reloads from and to every kind."""
    pong = await start_backend(nursery, replying(b"+PONG\r\n"))
    async with running_balancer(config_for([pong.address], health=fast("tcp"))) as (balancer, _):
        for kind, keys in [*KINDS.items(), ("tcp", {})]:
            # Most kinds fail against a +PONG server by waiting out their timeout: a short one.
            data = config_for([pong.address], health=fast(kind, **{"timeout": "300ms", **keys}))
            await balancer.apply_config(parse_config(data, "reloaded.toml"))
            server = balancer.pools["test"].servers[0]
            checks = server.checks_passed + server.checks_failed
            await wait_until(lambda s=server, c=checks: s.checks_passed + s.checks_failed > c + 1)
            assert balancer.pools["test"].config.health.check == kind
        assert server.healthy and server.last_check == "connected"
