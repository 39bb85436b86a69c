"""Replicas as children (spawn.py): real `anubis hello` and `python -m http.server` processes."""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    connect,
    connect_when_listening,
    free_port,
    receive_all,
    running_balancer,
    wait_until,
)
from trioanubis import spawn
from trioanubis.app import Balancer
from trioanubis.config import Address, parse_config
from trioanubis.errors import ConfigError
from trioanubis.ops.metrics import stats
from trioanubis.spawn import Spawner

ROOT = Path(__file__).resolve().parent.parent
HELLO = [sys.executable, "-m", "trioanubis", "hello", "--host", "127.0.0.1", "--name", "{port}",
         "--port", "{port}"]
HTTP_SERVER = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


def spawn_config(command: list[str], replicas: int = 3, **spawn: Any) -> dict[str, Any]:
    return {
        "listeners": {"test": {"bind": "127.0.0.1:0", "pool": "app"}},
        "pools": {"app": {
            "health": {"check": "tcp", "interval": "300ms", "timeout": "1s", "rise": 1, "fall": 1},
            "queue_timeout": "20s",
            "spawn": {"command": command, "replicas": replicas, "stop_grace": "2s", "cwd": str(ROOT),
                      **spawn},
        }},
    }  # fmt: skip


async def get(address: Address, path: str = "/") -> bytes:
    stream = await connect(address)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return await receive_all(stream)


def free_port_range(count: int) -> tuple[int, int]:
    """The first and last of `count` consecutive ports of this xdist worker's own (`free_port`)."""
    run: list[int] = []
    while len(run) < count:
        port = free_port()
        run = [*run, port] if run and port == run[-1] + 1 else [port]
    return run[0], run[-1]


def spawner_of(balancer: Balancer) -> Spawner:
    return balancer.spawners["app"]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
async def test_three_hello_replicas_all_take_traffic_and_a_killed_one_is_restarted() -> None:
    async with running_balancer(spawn_config(HELLO)) as (balancer, address):
        spawner = spawner_of(balancer)
        ports = {str(r.port).encode() for r in spawner.replicas}
        assert len(ports) == 3
        await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
        seen = {(await get(address)).rsplit(b" ", 1)[1].strip() for _ in range(6)}
        assert seen == ports
        victim = spawner.replicas[0]
        old_pid = victim.pid
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: victim.restarts == 1 and victim.pid not in (0, old_pid))
        await wait_until(lambda: not alive(old_pid))
        stream = await connect_when_listening(victim.port)
        await stream.aclose()
        await wait_until(lambda: victim.server.healthy)
        before = victim.server.total
        for _ in range(6):
            assert (await get(address)).startswith(b"HTTP/1.1 200 ")
        assert victim.server.total > before  # the restarted replica takes traffic again
        document = stats(balancer)["replicas"]["app"]
        assert [r["restarts"] for r in document["replicas"]] == [1, 0, 0]
        pids = [r.pid for r in spawner.replicas]
    for pid in pids:  # the balancer stopped: every replica with it
        assert not alive(pid)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["tcp", "none"])
async def test_a_replica_seen_to_exit_gets_no_connection_and_comes_back_once_restarted(check: str) -> None:
    """Out the moment its process exits, not after `eject_after` refused connects; back once the new
    process answers. Health checks are slow here (2 s, fall 3), so they cannot be what took it out."""
    config = spawn_config(HELLO)
    health = {"check": check, "interval": "2s", "timeout": "1s", "rise": 1, "fall": 3}
    config["pools"]["app"]["health"] = health
    async with running_balancer(config) as (balancer, address):
        spawner = spawner_of(balancer)
        await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
        for replica in spawner.replicas:  # listening: the first start is done
            await (await connect_when_listening(replica.port)).aclose()
        victim = spawner.replicas[0]
        os.kill(victim.pid, signal.SIGKILL)
        await wait_until(lambda: victim.restarts == 1)  # the spawner saw the exit
        assert not victim.server.healthy
        for _ in range(12):  # while it restarts: every one to the other two, none tried on it
            assert (await get(address)).startswith(b"HTTP/1.1 200 ")
        assert victim.server.connect_failures == 0
        await wait_until(lambda: victim.server.healthy, timeout=EVENTUALLY)  # back once restarted
        before = victim.server.total
        for _ in range(6):
            assert (await get(address)).startswith(b"HTTP/1.1 200 ")
        assert victim.server.total > before and victim.server.connect_failures == 0


@pytest.mark.slow
async def test_listeners_are_bound_before_any_replica_is_given_a_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica's port is one the kernel calls free (bind to port 0). Were the listeners bound after
    the replicas start, it could be a listener's own port, and the balancer then fails to start
    (a CI run saw `anubis proxy 127.0.0.1:52437` exit with `binding 127.0.0.1:52437: Address
    already in use` after its replica proxy-1 took 52437)."""
    port = free_port()
    listener_bound: list[bool] = []
    kernels_choice = spawn.free_port

    def checked(host: str) -> int:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                listener_bound.append(True)
            else:
                listener_bound.append(False)
        return kernels_choice(host)

    monkeypatch.setattr(spawn, "free_port", checked)
    data = spawn_config(HELLO, replicas=2)
    data["listeners"]["test"]["bind"] = f"127.0.0.1:{port}"
    async with running_balancer(data) as (balancer, address):
        assert address.port == port
        await wait_until(lambda: all(r.server.healthy for r in spawner_of(balancer).replicas))
        assert (await get(address)).startswith(b"HTTP/1.")
    assert listener_bound == [True, True]


@pytest.mark.slow
async def test_three_http_server_replicas_all_take_traffic() -> None:
    async with running_balancer(spawn_config(HTTP_SERVER)) as (balancer, address):
        spawner = spawner_of(balancer)
        await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
        for _ in range(6):
            assert (await get(address, "/README.md")).startswith(b"HTTP/1.0 200 OK")
        assert all(r.server.total == 2 for r in spawner.replicas)


@pytest.mark.slow
async def test_a_replica_that_cannot_start_is_retried_and_the_rest_serve() -> None:
    command = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    async with running_balancer(spawn_config(command, replicas=1, start_timeout="1s")) as (balancer, _):
        replica = spawner_of(balancer).replicas[0]
        await wait_until(lambda: replica.restarts >= 1)
        assert not replica.server.healthy


# ----------------------------------------------------------------- the CLI


async def _start_proxy(port: int, *extra: str) -> tuple[trio.Process, list[int], bytearray]:
    """`anubis proxy` with 3 hello replicas; returns once all three started, with their pids.

    Their ports come from this xdist worker's own (`--ports`): a port the system picks for a
    replica can be given to another test between the probe and the replica's bind (a CI run saw
    a fourth replica start in a roll of three)."""
    command = " ".join([*HELLO])
    first, last = free_port_range(5)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioanubis", "proxy", f"127.0.0.1:{port}", "--spawn", command,
         "--replicas", "3", "--ports", f"{first}-{last}", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    output = bytearray()
    assert process.stderr is not None
    try:
        with trio.fail_after(EVENTUALLY * 2):
            while b" ready" not in output:
                data = await process.stderr.receive_some()
                assert data, output.decode(errors="replace")
                output += data
        pids = [int(p) for p in re.findall(rb"replica proxy-\d+ started: pid (\d+)", output)]
        assert len(pids) == 3, output.decode(errors="replace")
    except BaseException:  # not started: leave no process behind for the next test to trip on
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return process, pids, output


@pytest.mark.slow
async def test_sigterm_to_the_balancer_leaves_no_replica() -> None:
    port = free_port()
    process, pids, _ = await _start_proxy(port)
    assert all(alive(pid) for pid in pids)
    stream = await connect_when_listening(port)
    await stream.aclose()
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(EVENTUALLY):
        await process.wait()
    assert process.returncode == 0
    assert not [pid for pid in pids if alive(pid)]


@pytest.mark.slow
async def test_sigkill_to_the_balancer_leaves_no_replica() -> None:
    if not sys.platform.startswith("linux"):
        return  # PR_SET_PDEATHSIG is Linux's; elsewhere only an orderly stop cleans up
    port = free_port()
    process, pids, _ = await _start_proxy(port)
    process.kill()
    with trio.fail_after(EVENTUALLY):
        await process.wait()
    await wait_until(lambda: not [pid for pid in pids if alive(pid)])


# ----------------------------------------------------------------- config


def test_spawn_needs_no_servers_and_resolves_paths(tmp_path: Path) -> None:
    path = tmp_path / "anubis.toml"
    path.write_text(
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app.spawn]\ncommand = ["python3", "-m", "http.server", "{port}"]\nreplicas = 2\n'
        'watch = ["src/**/*.py"]\nenv = { APP_ENV = "dev" }\n'
    )
    from trioanubis.config import load_config

    spawn = load_config(path).pools["app"].spawn
    assert spawn is not None and spawn.replicas == 2 and spawn.cwd == str(tmp_path / ".")
    assert spawn.watch == (str(tmp_path / "src/**/*.py"),) and spawn.env == (("APP_ENV", "dev"),)


def test_a_missing_program_is_named_at_check_time() -> None:
    data = spawn_config(["no-such-program-anywhere", "{port}"])
    try:
        parse_config(data, "t.toml")
    except ConfigError as exc:
        assert "pools.app.spawn.command[0]: names no executable program" in str(exc)
    else:
        raise AssertionError("accepted a missing program")


spawn_values = st.one_of(st.none(), st.integers(-3, 100), st.text(max_size=6), st.booleans(),
                         st.builds("{}-{}".format, st.integers(-2, 70000), st.integers(-2, 70000)),
                         st.lists(st.text(max_size=4), max_size=3),
                         st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))  # fmt: skip


@given(key=st.sampled_from(["command", "replicas", "cwd", "env", "watch", "host", "ports", "start_timeout",
                            "stop_grace", "comand"]), value=spawn_values)  # fmt: skip
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_spawn_keys_are_accepted_or_named_in_the_error(key: str, value: object) -> None:
    data = spawn_config(HELLO)
    table = data["pools"]["app"]["spawn"]
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
    try:
        config = parse_config(data, "t.toml")
    except ConfigError as exc:
        assert f"pools.app.spawn.{key}" in str(exc) or "pools.app.spawn" in str(exc), exc
        return
    spawn = config.pools["app"].spawn
    assert spawn is not None and spawn.command and spawn.replicas >= 1
    if spawn.ports is not None:
        first, last = spawn.ports
        assert 1 <= first <= last <= 65535 and last - first >= spawn.replicas


@pytest.mark.parametrize(("value", "message"), [
    ("4000-4099", None),
    ("4000-4003", None),  # replicas 3, and one more for a roll
    ("4000-4002", "must hold at least 4 ports (replicas, and one more for a rolling restart's new "
                  'replica), got "4000-4002"'),
    ("4000", 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099"), got "4000"'),
    (4000, 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099"), got 4000'),
    ("4000-", 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099"), got "4000-"'),
    (" 1-9", 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099"), got " 1-9"'),
    ("0-9", 'must be ports 1 to 65535, the first no higher than the last, got "0-9"'),
    ("9-1", 'must be ports 1 to 65535, the first no higher than the last, got "9-1"'),
    ("65530-65536", 'must be ports 1 to 65535, the first no higher than the last, got "65530-65536"'),
    ("1-999999", 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099"), got "1-999999"'),
])  # fmt: skip
def test_ports_is_a_range_with_room_for_a_roll_or_the_error_names_it(
    value: object, message: str | None,
) -> None:
    data = spawn_config(HELLO, ports=value)
    if message is None:
        spawn = parse_config(data, "t.toml").pools["app"].spawn
        assert spawn is not None and spawn.ports == tuple(int(p) for p in str(value).split("-"))
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "t.toml")
    assert str(caught.value) == f"t.toml: pools.app.spawn.ports: {message}"


@pytest.mark.slow
async def test_replicas_take_the_lowest_free_ports_of_the_range_and_a_roll_moves_them_within_it() -> None:
    first, last = free_port_range(5)
    with socket.socket() as other:  # another program listens on the range's first port
        other.bind(("127.0.0.1", first))
        other.listen()
        async with running_balancer(spawn_config(HELLO, replicas=2, ports=f"{first}-{last}")) as (
            balancer, address,
        ):  # fmt: skip
            spawner = spawner_of(balancer)
            assert [r.port for r in spawner.replicas] == [first + 1, first + 2]
            await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
            assert {(await get(address)).rsplit(b" ", 1)[1].strip() for _ in range(4)} == {
                str(first + 1).encode(), str(first + 2).encode()}  # fmt: skip
            spawner.request_roll("a test")
            await wait_until(lambda: spawner.rolls == 1, timeout=EVENTUALLY * 3)
            # The first new replica starts beside both old ones (first + 3); the second once the
            # first old one has stopped for good and given its port back (first + 1).
            assert [r.port for r in spawner.replicas] == [first + 3, first + 1]
            assert document_ports(balancer) == [first + 3, first + 1]
            await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
            assert (await get(address)).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
async def test_a_reload_to_fewer_replicas_in_a_smaller_range_keeps_them_in_it() -> None:
    """The surplus is retired before the roll: replacing all 3 first left the new range (room for
    1 + 1) full of old replicas, the first new one was given a port the system picks, and it was
    the one kept."""
    first, _ = free_port_range(4)
    async with running_balancer(spawn_config(HELLO, replicas=3, ports=f"{first}-{first + 3}")) as (
        balancer, _,
    ):  # fmt: skip
        spawner = spawner_of(balancer)
        fewer = spawn_config(HELLO, replicas=1, ports=f"{first}-{first + 1}")
        await balancer.apply_config(parse_config(fewer, "t.toml"))
        await wait_until(lambda: rolled([spawner], 1), timeout=EVENTUALLY * 3)
        assert spawner.rolls == 1 and [r.port for r in spawner.replicas] == [first + 1]


@pytest.mark.slow
@pytest.mark.parametrize(("ranged", "check"), [(True, "tcp"), (False, "tcp"), (True, "none")])
async def test_a_port_taken_while_the_replica_was_down_moves_it_and_no_client_reaches_the_taker(
    ranged: bool, check: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Between an exit and the restart nothing listens on the replica's port. Another program that
    binds it there would keep the replica from listening, and pass the replica's checks (a TCP
    check only connects): the replica restarts on another port, with a new server in the pool."""
    caplog.set_level(logging.INFO)
    first, last = free_port_range(3)
    extra = {"ports": f"{first}-{last}"} if ranged else {}
    config = spawn_config(HELLO, replicas=1, **extra)
    config["pools"]["app"]["health"]["check"] = check
    async with running_balancer(config) as (balancer, address):
        spawner = spawner_of(balancer)
        victim = spawner.replicas[0]
        await wait_until(lambda: victim.server.healthy)
        old_port, old_server = victim.port, victim.server
        with socket.socket() as taker:  # another program: it accepts and never answers
            taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for kills in range(1, 5):  # the port is taken in the backoff (0.5 s, then doubling)
                old_pid = victim.pid
                os.kill(old_pid, signal.SIGKILL)
                await wait_until(lambda n=kills: victim.restarts == n)  # exited, waiting to restart
                try:
                    taker.bind(("127.0.0.1", old_port))
                    break
                except OSError:  # restarted already (a slow machine): again, with a longer backoff
                    await wait_until(lambda gone=old_pid: victim.pid not in (0, gone))
                    await (await connect_when_listening(old_port)).aclose()
            taker.listen()
            await wait_until(lambda: victim.pid not in (0, old_pid), timeout=EVENTUALLY)
            assert victim.port != old_port and victim.server is not old_server
            assert not ranged or first <= victim.port <= last
            assert f"another program listens on its port {old_port} now; it restarts on {victim.port}" \
                in caplog.text  # fmt: skip
            assert balancer.pools["app"].servers == [victim.server] and old_server.removed
            await wait_until(lambda: victim.server.healthy, timeout=EVENTUALLY)
            # Down from the exit to the move (the taker passes a TCP check: the process is known not
            # to run); the new server came in down, and was put up once checked (none: listening).
            messages = [record.getMessage() for record in caplog.records]
            moved = next(i for i, m in enumerate(messages) if "another program listens on its port" in m)
            exited = max(i for i, m in enumerate(messages[:moved])
                         if m == "pool app: server app-1 is down (its process exited (killed by SIGKILL))")
            ups = [i for i, m in enumerate(messages) if m.startswith("pool app: server app-1 is up")]
            assert not [i for i in ups if exited < i < moved] and [i for i in ups if i > moved], messages
            for _ in range(3):
                with trio.fail_after(EVENTUALLY):
                    answer = await get(address)
                assert answer.rsplit(b" ", 1)[1].strip() == str(victim.port).encode()
            assert document_ports(balancer) == [victim.port]
        assert old_port not in spawn.HELD_PORTS and victim.port in spawn.HELD_PORTS
    assert victim.port not in spawn.HELD_PORTS


def document_ports(balancer: Balancer) -> list[int]:
    return [int(r["port"]) for r in stats(balancer)["replicas"]["app"]["replicas"]]


def rolled(spawners: list[Spawner], times: int) -> bool:
    return all(s.rolls + s.roll_failures >= times for s in spawners)


def named_hello(name: str) -> list[str]:
    """HELLO answering "hello from NAME@PORT"."""
    command = list(HELLO)
    command[command.index("--name") + 1] = f"{name}@{{port}}"
    return command


@pytest.mark.slow
async def test_two_pools_given_one_range_never_share_a_port_even_rolling_at_once() -> None:
    """A probe cannot see a port the other pool's new replica is about to bind: without a registry
    of every pool's ports, both took it, one replica could never listen, and its pool (its checks
    passing on the other app) sent its clients to the other pool's app."""
    first, last = free_port_range(6)
    ports = {"web": free_port(), "api": free_port()}

    def config(generation: int) -> dict[str, Any]:
        data = spawn_config(HELLO, replicas=2, ports=f"{first}-{last}", env={"GEN": str(generation)})
        data["listeners"] = {name: {"bind": f"127.0.0.1:{port}", "pool": name}
                             for name, port in ports.items()}  # fmt: skip
        app = data["pools"].pop("app")
        data["pools"] = {name: {**app, "spawn": {**app["spawn"], "command": named_hello(name)}}
                         for name in ports}  # fmt: skip
        return data

    async with running_balancer(config(0)) as (balancer, _):
        spawners = [spawner_of_pool(balancer, name) for name in ports]
        for generation in (1, 2):  # one reload changes both tables: both pools roll at once
            await balancer.apply_config(parse_config(config(generation), "t.toml"))
            await wait_until(functools.partial(rolled, spawners, generation), timeout=EVENTUALLY * 4)
            taken = [r.port for s in spawners for r in s.replicas]
            assert len(taken) == len(set(taken)) == 4 and all(first <= p <= last for p in taken), taken
        await wait_until(lambda: all(r.server.healthy for s in spawners for r in s.replicas))
        assert [r.restarts for s in spawners for r in s.replicas] == [0, 0, 0, 0]
        for name, port in ports.items():
            for _ in range(4):
                answer = await get(Address("127.0.0.1", port))
                assert answer.rsplit(b" ", 1)[1].startswith(f"{name}@".encode()), answer


@pytest.mark.slow
async def test_a_range_with_no_free_port_gives_one_the_system_picks_never_one_in_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica given a port another program listens on cannot bind, and its checks pass on that
    program: the pool sent its clients to it until it went away."""
    first, last = free_port_range(2)
    others = [socket.socket(), socket.socket()]
    for sock, port in zip(others, (first, last), strict=True):
        sock.bind(("127.0.0.1", port))
        sock.listen()
    try:
        config = spawn_config(HELLO, replicas=1, ports=f"{first}-{last}")
        async with running_balancer(config) as (balancer, address):
            replica = spawner_of(balancer).replicas[0]
            assert replica.port not in (first, last)
            assert f"no port in {first}-{last} is free" in caplog.text
            await wait_until(lambda: replica.server.healthy)
            assert (await get(address)).rsplit(b" ", 1)[1].strip() == str(replica.port).encode()
            assert replica.restarts == 0
    finally:
        for sock in others:
            sock.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--spawn", "true {port}", "--ports", "9-3"],
     'anubis proxy: --ports "9-3": must be ports 1 to 65535, the first no higher than the last'),
    (["--spawn", "true {port}", "--replicas", "2", "--ports", "4000-4001"],
     'anubis proxy: --ports "4000-4001": must hold at least 3 ports (--replicas 2, and one more for a '
     "rolling restart's new replica)"),
    (["127.0.0.1:9", "--ports", "4000-4099"],
     "anubis proxy: --ports gives spawned replicas their ports: it needs --spawn"),
    (["--spawn", "true {port}", "--ports", "4000\nanubis: forged-4001"],  # one line, escaped
     'anubis proxy: --ports "4000\\nanubis: forged-4001": must be a range of ports, "FIRST-LAST" (e.g. '
     '"4000-4099")'),
])  # fmt: skip
def test_proxy_ports_errors_name_the_argument(argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "trioanubis", "proxy", "127.0.0.1:0", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and done.stderr.strip() == f"anubis: {message}", done.stderr


# ----------------------------------------------------------------- rolling restarts


@pytest.mark.slow
async def test_a_roll_under_load_fails_no_request_and_replaces_every_replica(tmp_path: Path) -> None:
    watched = tmp_path / "src"
    watched.mkdir()
    (watched / "app.py").write_text("v = 1\n")
    data = spawn_config(HELLO, watch=[str(watched / "**" / "*.py")])
    async with running_balancer(data) as (balancer, address):
        spawner = spawner_of(balancer)
        await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
        first = {r.name for r in spawner.replicas}
        total, workers = 2000, 2
        done, failures, during_roll = 0, [], 0

        async def load() -> None:
            nonlocal done, during_roll
            while done < total:
                done += 1
                during_roll += spawner.rolling
                try:
                    answer = await get(address)
                except OSError as exc:  # trio.BrokenResourceError is not one: caught below
                    failures.append(repr(exc))
                    continue
                except trio.BrokenResourceError as exc:
                    failures.append(repr(exc))
                    continue
                if not answer.startswith(b"HTTP/1.1 200 "):
                    failures.append(answer[:80])

        (watched / "app.py").write_text("v = 2\n")  # the change: a roll starts within a second
        await wait_until(lambda: spawner.rolling)
        load_started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(load)
            await wait_until(lambda: spawner.rolls == 1, timeout=EVENTUALLY * 3)
            roll_done = trio.current_time()
        load_seconds = trio.current_time() - load_started
        assert failures == []
        now = {r.name for r in spawner.replicas}
        assert len(now) == 3 and not now & first, (first, now)
        assert all(r.server.healthy for r in spawner.replicas)
        print(f"\nroll of 3 replicas: {spawner.last_roll_seconds:.2f}s; {during_roll} of {total} requests "
              f"started while it ran; load {load_seconds:.2f}s, ended "
              f"{load_seconds - (roll_done - load_started):.2f}s after the roll; 0 failed")
        assert balancer.access.counts.get("connect_failed", 0) == 0
        assert balancer.access.counts.get("server_reset", 0) == 0


@pytest.mark.slow
async def test_a_replica_that_does_not_become_healthy_stops_the_roll_and_the_old_ones_serve() -> None:
    async with running_balancer(spawn_config(HELLO, replicas=2)) as (balancer, address):
        spawner = spawner_of(balancer)
        await wait_until(lambda: all(r.server.healthy for r in spawner.replicas))
        old = [(r.name, r.pid) for r in spawner.replicas]
        broken = spawn_config([sys.executable, "-c", "raise SystemExit(1)"], replicas=2, start_timeout="1s")
        await balancer.apply_config(parse_config(broken, "t.toml"))  # a reload: the changed table rolls
        await wait_until(lambda: spawner.roll_failures == 1)
        assert [(r.name, r.pid) for r in spawner.replicas] == old
        assert [s.name for s in balancer.pools["app"].servers] == [name for name, _ in old]
        assert (await get(address)).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
async def test_proxy_watch_rolls_the_replicas_when_a_file_changes(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("v = 1\n")
    port = free_port()
    process, pids, output = await _start_proxy(port, "--watch", str(tmp_path))
    try:
        (tmp_path / "app.py").write_text("v = 2\n")
        assert process.stderr is not None
        with trio.fail_after(EVENTUALLY * 3):
            while b"rolling restart done" not in output:
                output += await process.stderr.receive_some()
        stream = await connect_when_listening(port)
        await stream.aclose()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()
    assert process.returncode == 0
    assert not [pid for pid in pids if alive(pid)]
    started = [int(p) for p in re.findall(rb"replica proxy-\d+ started: pid (\d+)", output)]
    assert len(started) == 6 and not [pid for pid in started if alive(pid)]
    # A roll is routine: its steps are INFO, and nothing in it calls for attention.
    assert re.search(rb"INFO    pool proxy: rolling restart of 3 replicas \(.*app\.py changed\)", output)
    assert re.search(rb"INFO    pool proxy: rolling restart done in ", output)
    assert b" WARNING " not in output and b" ERROR " not in output, output.decode(errors="replace")


NEW_REFERENCE_KEYS = ("queue_timeout", "max_queued", "[pools.web.spawn]", "command", "replicas", "cwd", "env",
                      "watch", "host", "ports", "start_timeout", "stop_grace")  # fmt: skip


@pytest.mark.slow
async def test_the_reference_config_with_the_new_keys_uncommented_checks_and_runs() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: tomli, as config.py uses
        import tomli as tomllib

    lines, out, table = (ROOT / "anubis.toml").read_text().splitlines(), [], ""
    for line in lines:  # uncommented only in the tables they belong to: [pools.web] and its spawn
        if header := re.match(r"#? ?\[([\w.]+)\]", line):
            table = header.group(1)
        new = any(line.startswith(f"# {key} ") or line == f"# {key}" for key in NEW_REFERENCE_KEYS)
        out.append(line[2:] if new and table in ("pools.web", "pools.web.spawn") else line)
    text = "\n".join(out).replace('":8000"', '"127.0.0.1:0"')
    text = text.replace('"127.0.0.1:9900"', '"127.0.0.1:0"')
    data = tomllib.loads(text)
    config = parse_config(data, str(ROOT / "anubis.toml"))
    spawn = config.pools["web"].spawn
    assert spawn is not None and spawn.replicas == 1 and config.pools["web"].max_queued == 1000
    async with running_balancer(data) as (balancer, _):
        replica = spawner_of_pool(balancer, "web").replicas[0]
        await wait_until(lambda: replica.pid != 0)
        await balancer.apply_config(config)  # a reload of the same file changes nothing
        assert spawner_of_pool(balancer, "web").rolls == 0


def spawner_of_pool(balancer: Balancer, name: str) -> Spawner:
    return balancer.spawners[name]
