"""systemd: notification and socket activation (ops/systemd.py) with the real systemd-socket-activate,
and the unit files in deploy/systemd checked by the real systemd-analyze."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    echo_handler,
    echo_round_trip,
    free_port,
    name_handler,
    process_logging_to,
    request,
    start_backend,
    wait_for_log,
    wait_until,
)
from tests.peers import need
from trioanubis.config import Address
from trioanubis.ops import systemd
from trioanubis.ops.systemd import assign, parse_listen_environment

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux's")

ROOT = Path(__file__).resolve().parent.parent
ANUBIS = str(Path(sys.executable).with_name("anubis"))
# What systemd-socket-activate passes on besides its own variables (it passes almost nothing).
PASSED = ("PATH", "HOME", "PYTHONPATH", "ANUBIS_IO")


# ------------------------------------------------------------ pure functions


def test_listen_variables_are_read_only_for_their_pid() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:anubis.admin"}
    assert parse_listen_environment(env, 42) == [(3, "web"), (4, "anubis.admin")]
    assert parse_listen_environment(env, 43) == []  # inherited from a parent: not ours
    assert parse_listen_environment({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [(3, ""), (4, "")]
    assert parse_listen_environment({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, 42) == []
    for bad in ("-1", "x", "9" * 30, "", "٣"):
        with pytest.raises(ValueError, match="LISTEN_FDS"):
            parse_listen_environment({"LISTEN_PID": "42", "LISTEN_FDS": bad}, 42)


@pytest.mark.slow
@given(st.dictionaries(st.sampled_from(["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "X"]),
                       st.one_of(st.text(max_size=20), st.just("7"), st.integers(0, 9).map(str))))
@settings(max_examples=500, deadline=None)
def test_any_listen_environment_parses_or_is_a_value_error(env: dict[str, str]) -> None:
    try:
        passed = parse_listen_environment(env, 7)
    except ValueError:
        return
    assert [fd for fd, _ in passed] == list(range(3, 3 + len(passed)))
    assert len(passed) <= systemd.MAX_LISTEN_FDS


def test_sockets_go_to_listeners_by_name_then_unnamed_in_order() -> None:
    listeners = ["web", "api", "db"]
    assert assign(listeners, ["api", "web"]) == ({"api": [0], "web": [1]}, [])
    assert assign(listeners, ["web", "web", "anubis.socket"]) == ({"web": [0, 1], "api": [2]}, [])
    assert assign(listeners, ["", "unknown", "x.socket", ""]) == ({"web": [0], "api": [1], "db": [2]}, [3])
    assert assign(listeners, ["stray", "db"]) == ({"db": [1]}, [0])
    admin = ["anubis.admin"]
    assert assign(listeners, ["anubis.admin", ""], admin) == ({"anubis.admin": [0], "web": [1]}, [])
    assert assign([], ["", "anubis.admin"], ["anubis.admin"]) == ({"anubis.admin": [1]}, [0])


@pytest.mark.slow
@given(st.lists(st.sampled_from(["a", "b", "c"]), unique=True),
       st.lists(st.sampled_from(["a", "b", "c", "d", "", "unknown", "u.socket", "anubis.admin"]), max_size=8))
@settings(max_examples=500, deadline=None)
def test_every_socket_is_taken_once_or_left_unused(listeners: list[str], names: list[str]) -> None:
    taken, unused = assign(listeners, names, ["anubis.admin"])
    indices = sorted([i for group in taken.values() for i in group] + unused)
    assert indices == list(range(len(names)))
    for name, group in taken.items():
        assert name in listeners or name == "anubis.admin"
        assert all(names[i] == name or systemd.is_unnamed(names[i]) for i in group)
    assert all(not systemd.is_unnamed(names[i]) or len(taken) >= len(listeners) for i in unused)


@contextmanager
def notify_receiver(abstract: bool, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A Unix datagram socket bound where NOTIFY_SOCKET will name it: ('@name' or a path, socket)."""
    name = f"@anubis-test-{os.getpid()}-{free_port()}" if abstract else str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if abstract else name)
    sock.setblocking(False)
    with sock:
        yield name, sock


@pytest.mark.parametrize("abstract", [True, False])
def test_notify_sends_one_datagram_to_the_socket_claimed_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    with notify_receiver(abstract, tmp_path) as (name, sock):
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        try:
            assert systemd.claim_environment() == []
            assert "NOTIFY_SOCKET" not in os.environ  # no child inherits it
            assert systemd.notify("READY=1", "STATUS=serving")
            assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        finally:
            systemd.release_notify()
    assert not systemd.notify("READY=1")  # released: nobody listens


def test_notify_to_a_socket_nobody_binds_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    systemd.claim_environment()
    try:
        assert not systemd.notify("READY=1")
        assert not systemd.notify("STOPPING=1")
    finally:
        systemd.release_notify()
        systemd._Claimed.warned = False


@pytest.mark.slow
@given(st.one_of(st.text(max_size=300), st.text(max_size=300).map(lambda t: "/" + t),
                 st.text(max_size=300).map(lambda t: "@" + t)))
@settings(max_examples=300, deadline=None)
def test_any_notify_socket_value_is_sent_to_or_logged_never_raised(value: str) -> None:
    systemd._Claimed.path = value or None
    try:
        assert systemd.notify("READY=1", "STATUS=ü\x00") in (True, False)
    finally:
        systemd.release_notify()
        systemd._Claimed.warned = False


# --------------------------------------------------- systemd-socket-activate


class Notifications:
    """What anubis told the test's NOTIFY_SOCKET, one datagram each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.seen: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        with trio.fail_after(EVENTUALLY):
            data = await self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(fields)
        return fields


def write_config(path: Path, listeners: dict[str, tuple[int, str]], *, admin: int = 0, workers: int = 1,
                 **settings: Any) -> None:  # fmt: skip
    """Listeners name → (port, server); each listener has its own pool of one server."""
    lines = ["[settings]", f"workers = {workers}", "access_log = false", 'drain_timeout = "10s"',
             f'pid_file = "{path.with_suffix(".pid")}"']  # fmt: skip
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    if admin:
        lines += ["[admin]", f'bind = "127.0.0.1:{admin}"']
    for name, (port, server) in listeners.items():
        lines += [f"[listeners.{name}]", f'bind = "127.0.0.1:{port}"', f'pool = "{name}"',
                  f"[pools.{name}]", f'servers = ["{server}"]', f"[pools.{name}.health]", 'check = "none"']
    path.write_text("\n".join(lines) + "\n")


@asynccontextmanager
async def socket_activated(tmp_path: Path, config: Path, ports: list[int], names: str | None,
                           notify: str) -> AsyncIterator[trio.Process]:  # fmt: skip
    """`systemd-socket-activate -l PORT... [--fdname=NAMES] anubis run -c CONFIG`, as systemd would."""
    command = [need("systemd-socket-activate")]
    for port in ports:
        command += ["-l", f"127.0.0.1:{port}"]
    if names is not None:
        command.append(f"--fdname={names}")
    command += [f"-E{key}={os.environ[key]}" for key in PASSED if key in os.environ]
    command += [f"-ENOTIFY_SOCKET={notify}", ANUBIS, "run", "-c", str(config)]
    async with process_logging_to(command, tmp_path / "anubis.log") as process:
        await wait_for_log(tmp_path / "anubis.log", f"127.0.0.1:{ports[-1]} as")  # it listens
        yield process
    assert process.returncode == 0, (tmp_path / "anubis.log").read_text()


def listening_inodes(port: int) -> set[int]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            found.add(int(fields[9]))
    return found


def socket_inode(pid: int, fd: int) -> int:
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert target.startswith("socket:["), target
    return int(target[len("socket:[") : -1])


@pytest.mark.slow
async def test_socket_activated_anubis_serves_on_the_passed_socket_and_notifies_systemd(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    passed, configured = free_port(), free_port()  # the listener's own bind is not what it serves on
    own = free_port()  # a listener with no socket passed binds its own, as usual
    config = tmp_path / "anubis.toml"
    write_config(config, {"web": (configured, backend.address), "other": (own, backend.address)})
    with trio.fail_after(3 * EVENTUALLY):  # one deadline for the whole conversation
        with notify_receiver(True, tmp_path) as (name, sock):
            notifications = Notifications(sock)
            async with socket_activated(tmp_path, config, [passed], "web", name) as process:
                # The first connection is what makes systemd-socket-activate start anubis: it waits in
                # the backlog and anubis, adopting the socket, serves it.
                await echo_round_trip(Address("127.0.0.1", passed), b"first")
                ready = await notifications.next()
                status = f"serving on web 127.0.0.1:{passed}, other 127.0.0.1:{own}"
                assert ready == {"READY": "1", "STATUS": status}
                assert listening_inodes(passed) == {socket_inode(process.pid, 3)}  # no second socket bound
                assert listening_inodes(configured) == set()
                await echo_round_trip(Address("127.0.0.1", own), b"on its own bind")
                # The log's writer keeps its own pace: a line may reach the file after READY does.
                taken = f"taking the inherited socket on 127.0.0.1:{passed} (descriptor 3)"
                await wait_for_log(tmp_path / "anubis.log", taken)
                process.send_signal(signal.SIGHUP)
                reloading = await notifications.next()
                assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
                assert (await notifications.next())["READY"] == "1"
                await echo_round_trip(Address("127.0.0.1", passed), b"after the reload")  # the same socket
                process.send_signal(signal.SIGTERM)
                assert (await notifications.next())["STOPPING"] == "1"
                await process.wait()  # (a second SIGTERM at the end would race its exit)


@pytest.mark.slow
async def test_unnamed_sockets_go_to_the_listeners_in_order_and_a_stray_name_is_closed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    first, second, stray = free_port(), free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, {"a": (0, one.address), "b": (0, two.address)})
    with trio.fail_after(3 * EVENTUALLY):  # one deadline for the whole conversation
        with notify_receiver(True, tmp_path) as (name, sock):
            notifications = Notifications(sock)
            # systemd's name for an unnamed socket of anubis.socket is "anubis.socket".
            async with socket_activated(tmp_path, config, [first, second, stray],
                                        "anubis.socket:unknown:stray", name):  # fmt: skip
                assert await request(Address("127.0.0.1", first)) == b"one"
                assert (await notifications.next())["READY"] == "1"
                assert await request(Address("127.0.0.1", second)) == b"two"
                why = "no listener of the config has its name"
                closed = f"inherited socket ('127.0.0.1', {stray}) closed: {why}"
                await wait_for_log(tmp_path / "anubis.log", closed)  # written at the log writer's pace
                assert listening_inodes(stray) == set()


@pytest.mark.slow
async def test_workers_share_the_passed_socket_and_the_supervisor_notifies(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    passed = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, {"web": (0, backend.address)}, workers=2)
    with trio.fail_after(3 * EVENTUALLY):  # one deadline for the whole conversation
        with notify_receiver(False, tmp_path) as (name, sock):
            notifications = Notifications(sock)
            async with socket_activated(tmp_path, config, [passed], "web", name) as process:
                await echo_round_trip(Address("127.0.0.1", passed), b"first")
                ready = await notifications.next()
                assert ready == {"READY": "1", "STATUS": "serving with 2 workers"}
                log = await wait_for_log(tmp_path / "anubis.log", "2 workers serving")
                assert "listeners: web shared" in log  # systemd's socket has no SO_REUSEPORT siblings
                assert listening_inodes(passed) == {socket_inode(process.pid, 3)}
                for k in range(20):
                    await echo_round_trip(Address("127.0.0.1", passed), b"x" * k)
                workers = await worker_pids(process.pid, 2)
                for pid in workers:
                    assert socket_inode(pid, 3) == socket_inode(process.pid, 3)  # inherited, not bound
                    assert "NOTIFY_SOCKET" not in Path(f"/proc/{pid}/environ").read_text()
                process.send_signal(signal.SIGHUP)
                assert (await notifications.next())["RELOADING"] == "1"
                assert (await notifications.next())["READY"] == "1"
                process.send_signal(signal.SIGTERM)
                assert (await notifications.next())["STOPPING"] == "1"
                await process.wait()  # (a second SIGTERM at the end would race its exit)
    assert len(notifications.seen) == 4  # nothing from the workers


async def worker_pids(supervisor: int, count: int) -> list[int]:
    """The supervisor's children (its workers), once there are `count`."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    await wait_until(lambda: len(path.read_text().split()) == count)
    return [int(pid) for pid in path.read_text().split()]


# ---------------------------------------------------------------- unit files


def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    for unit in ("anubis.service", "anubis.socket"):  # the ExecStart path made to exist here
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/anubis", ANUBIS))
    units = [str(tmp_path / "anubis.service"), str(tmp_path / "anubis.socket")]
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections → key → values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / name).read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def test_the_service_is_type_notify_reloads_with_sighup_and_is_hardened() -> None:
    service = unit("anubis.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"][0].split()[1:3] == ["run", "-c"]
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "DynamicUser", "RestrictAddressFamilies",
                "SystemCallFilter", "CapabilityBoundingSet"):  # fmt: skip
        assert key in service, key
    socket_unit = unit("anubis.socket")
    assert socket_unit["Socket"]["Service"] == ["anubis.service"]
    assert socket_unit["Socket"]["FileDescriptorName"] == ["web"]  # a listener of the shipped config
    assert "[listeners.web]" in (ROOT / "anubis.toml").read_text()
