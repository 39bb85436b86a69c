"""Operating the balancer: graceful drain, hot reload, access log — real processes and signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    config_for,
    connect,
    echo_handler,
    echo_round_trip,
    ending,
    free_port,
    name_handler,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import (
    anubis,
    http_get,
    run_cli,
    wait_port,
)
from trioanubis.app import Balancer
from trioanubis.config import Address, load_config, parse_config
from trioanubis.errors import AnubisError
from trioanubis.ops.metrics import prometheus, stats
from trioanubis.proxy.listener import open_listen_socket

MIB = 1 << 20


def write_config(path: Path, port: int, servers: list[str], **settings: object) -> None:
    lines = ["[settings]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[listeners.web]", f'bind = "127.0.0.1:{port}"', 'pool = "web"', "[pools.web]",
              f"servers = {json.dumps(servers)}", "[pools.web.health]", 'check = "none"']  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def streaming(size: int, seed: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A backend that sends `size` deterministic bytes and closes."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
            try:
                for _ in range(size // len(block)):
                    await stream.send_all(block)
            except trio.BrokenResourceError:
                pass

    return handler


@pytest.mark.slow
async def test_sigterm_mid_transfer_completes_byte_exact_and_exits_zero(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    size = 32 * MIB
    backend = await start_backend(nursery, streaming(size, b"seed"))
    port = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, [backend.address], drain_timeout="60s")
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        await wait_until(lambda: backend.connections == 1)  # wait_port's probe connection
        stream = await connect(Address("127.0.0.1", port))
        received = bytearray(await stream.receive_some(65536))
        process.send_signal(signal.SIGTERM)  # mid-transfer
        received += await receive_all(stream)
        await stream.aclose()
        with trio.fail_after(30):
            await process.wait()
        assert process.returncode == 0
    block = hashlib.sha256(b"seed").digest() * 2048
    assert len(received) == size
    assert hashlib.sha256(received).digest() == hashlib.sha256(block * (size // len(block))).digest()


@pytest.mark.slow
async def test_second_signal_cuts_open_connections_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    server_endings: list[str] = []

    async def echo_then_note_the_end(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                server_endings.append("reset" if isinstance(exc.__cause__, ConnectionResetError) else "error")
                return
            server_endings.append("eof")

    backend = await start_backend(nursery, echo_then_note_the_end)
    port = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, [backend.address], drain_timeout="1h")
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        async with await connect(Address("127.0.0.1", port)) as stream:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
            process.send_signal(signal.SIGTERM)
            await wait_port_closed(port)  # listeners close at once; the connection stays
            await stream.send_all(b"y")
            assert await stream.receive_some(1) == b"y"
            process.send_signal(signal.SIGINT)
            with trio.fail_after(30):  # far less than the 1 h drain
                await process.wait()
                assert await ending(stream) == "reset"  # cut, so both sides get a reset, not a FIN
                await wait_until(lambda: "reset" in server_endings)  # (wait_port's probe ended with EOF)
        assert process.returncode == 0


async def wait_port_closed(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_sighup_adds_a_server_and_keeps_open_connections(nursery: trio.Nursery, tmp_path: Path) -> None:
    old = await start_backend(nursery, echo_handler, "old")
    new = await start_backend(nursery, name_handler("new"))
    port = free_port()
    config, pid_file = tmp_path / "anubis.toml", tmp_path / "anubis.pid"
    write_config(config, port, [old.address], pid_file=str(pid_file))
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        # The pid file names the process once it serves (after its listeners answer: app.py), so that
        # an upgrade's new process takes it over only then; wait for it rather than race it.
        await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() == str(process.pid))
        held = await connect(Address("127.0.0.1", port))
        await held.send_all(b"long-lived")
        assert await held.receive_some(10) == b"long-lived"
        write_config(config, port, [new.address], pid_file=str(pid_file))  # old removed, new added
        result = await trio.to_thread.run_sync(run_cli, "reload", "-c", str(config))
        assert result.returncode == 0, result.stderr
        with trio.fail_after(30):
            while await request(Address("127.0.0.1", port)) != b"new":
                await trio.sleep(0.05)
        await held.send_all(b"still here")  # the old server's connection is intact
        assert await held.receive_some(10) == b"still here"
        await held.aclose()
    assert not pid_file.exists()


@pytest.mark.slow
async def test_invalid_reload_keeps_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    port = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, [backend.address])
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        config.write_text(config.read_text().replace('check = "none"', 'check = "sometimes"'))
        process.send_signal(signal.SIGHUP)
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(30):
            while b"reload rejected" not in seen:
                seen += await process.stderr.receive_some()
        assert b'pools.web.health.check: must be one of' in seen
        assert await request(Address("127.0.0.1", port)) == b"a"


@pytest.mark.slow
async def test_watch_reloads_when_the_file_changes(nursery: trio.Nursery, tmp_path: Path) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, [one.address])
    async with anubis("run", "--watch", "-c", str(config)):
        await wait_port(port)
        assert await request(Address("127.0.0.1", port)) == b"one"
        write_config(config, port, [two.address])
        os.utime(config, (0, os.stat(config).st_mtime + 5))  # a visibly newer mtime
        with trio.fail_after(30):
            while await request(Address("127.0.0.1", port)) != b"two":
                await trio.sleep(0.05)


@pytest.mark.slow
async def test_watch_sees_a_change_made_before_its_first_look(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The race behind a rare failure of the test above: the watcher took its first look at the file
    only when its task first ran, after the listeners were up, so a change made in between was
    taken for the original. The file is compared with what it was when the config was loaded."""
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    config = tmp_path / "anubis.toml"
    write_config(config, 0, [one.address])
    balancer = Balancer(load_config(config), config_path=str(config), watch=True)
    write_config(config, 0, [two.address])  # changed before the watcher's task has even started
    os.utime(config, (0, os.stat(config).st_mtime + 5))
    async with trio.open_nursery() as inner:
        address = next(iter((await inner.start(balancer.run)).values()))
        with trio.fail_after(30):
            while await request(address) != b"two":
                await trio.sleep(0.05)
        balancer.shutdown()
    assert balancer.reloads == 1


@pytest.mark.slow
async def test_json_access_log_lines_carry_how_each_connection_ended(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    port, dead = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(
        f'[settings]\nlog_format = "json"\n[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
        f'[listeners.dead]\nbind = "127.0.0.1:{free_port()}"\npool = "dead"\n'
        f'[pools.web]\nservers = ["{backend.address}"]\nhealth = {{ check = "none" }}\n'
        f'[pools.dead]\nservers = ["127.0.0.1:{dead}"]\nretries = 0\nhealth = {{ check = "none" }}\n'
    )
    dead_port = parse_config_ports(config)["dead"]
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        assert await request(Address("127.0.0.1", port)) == b"a"
        stream = await connect(Address("127.0.0.1", dead_port))
        await receive_all(stream)
        await stream.aclose()
        assert process.stderr is not None
        lines: list[dict[str, object]] = []
        with trio.fail_after(30):
            buffer = b""
            while sum(1 for line in lines if "end" in line) < 3:
                buffer += await process.stderr.receive_some()
                *complete, buffer = buffer.split(b"\n")
                lines += [json.loads(line) for line in complete if line]
    access = [line for line in lines if "end" in line]
    ends = {(line["listener"], line["end"]) for line in access}
    assert ("web", "client_eof") in ends and ("dead", "connect_failed") in ends
    assert all(line["logger"] == "trioanubis.access" for line in access)
    fields = {"client", "server", "bytes_in", "bytes_out", "duration", "time"}
    assert all(fields <= set(line) for line in access)
    assert all(line["duration"] >= 0 for line in access)  # measured from start to end, once


def parse_config_ports(path: Path) -> dict[str, int]:
    return {name: lc.bind.port for name, lc in load_config(path).listeners.items()}


async def test_reload_in_process_changes_strategy_weights_and_listeners(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    data = config_for([{"address": one.address, "name": "one"}, {"address": two.address, "name": "two"}])
    async with running_balancer(data) as (balancer, address):
        data["pools"]["test"]["servers"][0]["weight"] = 0
        data["listeners"]["extra"] = {"bind": "127.0.0.1:0", "pool": "test"}
        await balancer.apply_config(parse_config(data, "reloaded.toml"))
        assert {await request(address) for _ in range(4)} == {b"two"}
        extra = balancer.listeners["extra"].bound
        assert extra is not None and await request(extra) == b"two"
        del data["listeners"]["extra"]
        data["pools"]["test"]["strategy"] = "least_connections"
        await balancer.apply_config(parse_config(data, "reloaded.toml"))
        assert "extra" not in balancer.listeners
        assert type(balancer.pools["test"].strategy).__name__ == "LeastConnections"
        assert balancer.reloads == 2


async def test_reload_narrowing_a_wildcard_bind_to_loopback_moves_the_listener(nursery: trio.Nursery) -> None:
    """":PORT" → "127.0.0.1:PORT" on another pool, the old pool gone: the kernel refuses a second bind
    while the old socket holds the port, so the old one is closed first (as a restart would)."""
    old = await start_backend(nursery, name_handler("old"))
    new = await start_backend(nursery, name_handler("new"))
    port = free_port()
    data = {"listeners": {"web": {"bind": f":{port}", "pool": "old"}},
            "pools": {"old": {"servers": [old.address], "health": {"check": "none"}},
                      "new": {"servers": [new.address], "health": {"check": "none"}}}}  # fmt: skip
    async with running_balancer(data) as (balancer, _):
        assert await request(Address("127.0.0.1", port)) == b"old"
        data["listeners"]["web"] = {"bind": f"127.0.0.1:{port}", "pool": "new"}
        del data["pools"]["old"]
        await balancer.apply_config(parse_config(data, "reloaded.toml"))
        assert balancer.listeners["web"].bound == Address("127.0.0.1", port)
        assert await request(Address("127.0.0.1", port)) == b"new"
        assert list(balancer.pools) == ["new"]
        assert (balancer.reloads, balancer.reload_failures) == (1, 0)


async def test_a_listener_that_cannot_move_keeps_its_pool(nursery: trio.Nursery) -> None:
    """The new bind is taken by someone else: the listener stays where it was, and so does the pool
    it sends clients to, though the new file removed it; the reload is counted as failed."""
    old = await start_backend(nursery, name_handler("old"))
    new = await start_backend(nursery, name_handler("new"))
    data = {"listeners": {"web": {"bind": "127.0.0.1:0", "pool": "old"}},
            "pools": {"old": {"servers": [old.address], "health": {"check": "none"}},
                      "new": {"servers": [new.address], "health": {"check": "none"}}}}  # fmt: skip
    with trio.socket.socket() as squatter:
        await squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        async with running_balancer(data) as (balancer, address):
            data["listeners"]["web"] = {"bind": f"127.0.0.1:{taken}", "pool": "new"}
            del data["pools"]["old"]
            await balancer.apply_config(parse_config(data, "reloaded.toml"))
            assert balancer.listeners["web"].bound == address
            assert await request(address) == b"old"
            assert sorted(balancer.pools) == ["new", "old"]
            assert (balancer.reloads, balancer.reload_failures) == (0, 1)
            metrics = prometheus(balancer)
            assert 'anubis_reloads_total{result="failed"} 1' in metrics
            assert stats(balancer)["reload_failures"] == 1
            await balancer.apply_config(parse_config(data, "reloaded.toml"))  # still taken: the same
            assert await request(address) == b"old"


async def test_a_listener_whose_port_is_lost_during_the_hand_over_closes_and_the_process_serves_on(
    nursery: trio.Nursery,
) -> None:
    """Worst case of the hand-over: after the old socket closed, neither the new bind nor the old one
    can be had again (another process took the port in between). The listener closes; the reload
    and the process go on."""
    backend = await start_backend(nursery, name_handler("b"))
    port = free_port()
    taken = {"now": False}

    async def open_socket(bind: Address, backlog: int) -> socket.socket:
        if taken["now"]:
            raise AnubisError(f"binding {bind}: Address already in use")
        return await open_listen_socket(bind, backlog)

    listeners = {"web": {"bind": f":{port}", "pool": "p"}, "api": {"bind": "127.0.0.1:0", "pool": "p"}}
    pools = {"p": {"servers": [backend.address], "health": {"check": "none"}}}
    data = {"listeners": listeners, "pools": pools}
    balancer = Balancer(parse_config(data, "t.toml"), open_socket=open_socket)
    bound = await nursery.start(balancer.run)
    taken["now"] = True
    data["listeners"]["web"] = {"bind": f"127.0.0.1:{port}", "pool": "p"}
    await balancer.apply_config(parse_config(data, "reloaded.toml"))
    assert "web" not in balancer.listeners
    assert balancer.reload_failures == 1 and not balancer.stopped.is_set()
    assert await request(bound["api"]) == b"b"
    balancer.shutdown()
    await balancer.stopped.wait()


async def test_a_start_that_fails_after_binding_closes_the_sockets_it_bound() -> None:
    """Every listener is bound before the pools and replicas start; when start-up fails after that
    (here the second listener's bind), the sockets already bound are closed, not left to the GC."""
    opened: list[socket.socket] = []

    async def open_socket(bind: Address, backlog: int) -> socket.socket:
        if bind.port == 1:
            raise AnubisError(f"binding {bind}: Permission denied")
        opened.append(sock := await open_listen_socket(bind, backlog))
        return sock

    listeners = {"a": {"bind": "127.0.0.1:0", "pool": "p"}, "b": {"bind": "127.0.0.1:1", "pool": "p"}}
    data = {"listeners": listeners, "pools": {"p": {"servers": ["127.0.0.1:9"], "health": {"check": "none"}}}}
    balancer = Balancer(parse_config(data, "t.toml"), open_socket=open_socket)
    with pytest.raises(BaseException) as failed:
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
    assert "binding 127.0.0.1:1: Permission denied" in repr(failed.value)
    assert len(opened) == 1 and opened[0].fileno() == -1  # closed
    assert balancer.stopped.is_set()


async def test_reload_that_changes_io_keeps_the_backend_and_says_so(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("trioanubis"), "propagate", True)
    backend = await start_backend(nursery, name_handler("same"))
    data = config_for([backend.address])
    async with running_balancer(data) as (balancer, address):
        running = balancer.poller.caps.name
        data["settings"] = {"io": "portable"}  # was "auto"
        with caplog.at_level(logging.WARNING, logger="trioanubis"):
            await balancer.apply_config(parse_config(data, "reloaded.toml"))
        assert "settings.io changes take effect at the next restart" in caplog.text
        assert balancer.poller.caps.name == running
        assert await request(address) == b"same"


async def test_access_log_off_logs_no_lines_but_still_counts(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    logging.getLogger("trioanubis").propagate = True
    backend = await start_backend(nursery, name_handler("quiet"))
    data = config_for([backend.address], settings={"access_log": False})
    with caplog.at_level(logging.INFO, logger="trioanubis"):
        async with running_balancer(data) as (balancer, address):
            assert await request(address) == b"quiet"
            await wait_until(lambda: balancer.access.counts == {"client_eof": 1})
    assert not [r for r in caplog.records if r.name == "trioanubis.access"]


def write_delayed(path: Path, port: int, admin: int, server: str, delay: str, workers: int = 1) -> None:
    write_config(path, port, [server], shutdown_delay=delay, drain_timeout="1h", workers=workers)
    path.write_text(path.read_text() + f'[admin]\nbind = "127.0.0.1:{admin}"\n')


async def readyz(admin: int) -> int:
    return int((await http_get(admin, "/readyz")).split()[1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_shutdown_delay_keeps_accepting_while_not_ready_and_a_second_signal_stops_at_once(
    nursery: trio.Nursery, tmp_path: Path, workers: int
) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_delayed(config, port, admin, backend.address, "10m", workers)
    async with anubis("run", "-c", str(config)) as process:
        with trio.fail_after(30):
            while await readyz(admin) != 200:  # (with workers: once every worker serves)
                await trio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while await readyz(admin) != 503:  # the stop has begun: Kubernetes stops sending traffic
                await trio.sleep(0.05)
        for k in range(20):  # a sidecar's application, still finishing its work, is still served
            await echo_round_trip(Address("127.0.0.1", port), b"late %d" % k)
        process.send_signal(signal.SIGTERM)  # a second signal does not wait out the delay
        with trio.fail_after(30):
            await process.wait()
        assert process.returncode == 0


@pytest.mark.slow
async def test_after_shutdown_delay_the_listener_closes_and_open_connections_drain(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_delayed(config, port, admin, backend.address, "300ms")
    async with anubis("run", "-c", str(config)) as process:
        await wait_port(port)
        async with await connect(Address("127.0.0.1", port)) as held:
            process.send_signal(signal.SIGTERM)
            await wait_port_closed(port)  # the delay ran out: no new connection now
            await held.send_all(b"draining")
            assert await held.receive_some(8) == b"draining"
        with trio.fail_after(30):  # its last connection closed: the drain is over (not the 1 h)
            await process.wait()
        assert process.returncode == 0
