"""Upgrade in place (upgrade.py): SIGUSR2 / `anubis upgrade` on real processes, with clients connecting
all through it; and the hand-over itself (the successor's descriptors and environment, its report)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    connect,
    echo_handler,
    echo_round_trip,
    free_port,
    process_logging_to,
    start_backend,
    wait_for_log,
    wait_until,
)
from tests.helpers import ANUBIS, run_cli
from trioanubis import upgrade
from trioanubis.config import Address
from trioanubis.upgrade import UpgradeFailed, is_ready, start_successor, successor_environment

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="upgrade in place is Unix's")

# Round trips after the old process is gone: the new one alone serves them.
AFTER = 100


def write_config(path: Path, port: int, admin: int, server: str, *, workers: int = 1) -> Path:
    lines = ["[settings]", f"workers = {workers}", "access_log = false", 'drain_timeout = "20s"',
             f'pid_file = "{path.with_suffix(".pid")}"',
             "[admin]", f'bind = "127.0.0.1:{admin}"',
             "[listeners.web]", f'bind = "127.0.0.1:{port}"', 'pool = "web"',
             "[pools.web]", f"servers = {json.dumps([server])}",
             "[pools.web.health]", 'check = "none"']  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path.with_suffix(".pid")


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def gone(pid: int) -> bool:
    """Ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores `signum` (/proc's SigIgn mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signum - 1)))


@asynccontextmanager
async def upgradable(config: Path, log: Path, pid_file: Path) -> AsyncIterator[trio.Process]:
    """`anubis run -c CONFIG`; at the end, whatever process the pid file names by then is stopped
    too (an upgrade's new process is not our child, and a failed assertion must not leave it)."""
    try:
        async with process_logging_to([*ANUBIS, "run", "-c", str(config)], log) as old:
            yield old
    finally:
        new = read_pid(pid_file)
        if new is not None and not gone(new):
            os.kill(new, signal.SIGTERM)
            with trio.move_on_after(EVENTUALLY):
                await wait_until(lambda: gone(new))


class Clients:
    """Client loops: echo round trips back to back, one connection each; every failure is kept."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.done = 0
        self.failures: list[str] = []

    async def loop(self, k: int) -> None:
        while True:
            payload = f"{k}:{self.done}".encode() * 50
            try:
                await echo_round_trip(self.address, payload)
            except (OSError, trio.BrokenResourceError, AssertionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc} ({exc.__cause__!r})")
            else:
                self.done += 1

    async def run_until(self, more: int) -> None:
        """Return once `more` round trips were done from now (failures or not)."""
        target = self.done + more
        await wait_until(lambda: self.done + len(self.failures) >= target)


async def admin_json(port: int, path: str) -> Any:
    async with await connect(Address("127.0.0.1", port)) as stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
    return json.loads(answer.partition(b"\r\n\r\n")[2])


async def upgrade_under_load(tmp_path: Path, nursery: trio.Nursery, workers: int) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    pid_file = write_config(config, port, admin, backend.address, workers=workers)
    log = tmp_path / "anubis.log"
    address = Address("127.0.0.1", port)
    async with upgradable(config, log, pid_file) as old:
        await wait_until(lambda: read_pid(pid_file) == old.pid)
        if workers > 1:
            await wait_for_log(log, f"{workers} workers serving")
        old_workers = [w["pid"] for w in (await admin_json(admin, "/stats")).get("workers", [])]
        for pid in old_workers:  # `systemctl kill -s USR2` reaches them too: only the supervisor acts
            assert ignores(pid, signal.SIGUSR2)
        held = await connect(address)  # open through the upgrade: the old process drains it
        await held.send_all(b"before")
        assert await held.receive_some(6) == b"before"
        clients = Clients(address)
        async with trio.open_nursery() as loops:
            for k in range(4):
                loops.start_soon(clients.loop, k)
            await clients.run_until(50)
            result = await trio.run_process([*ANUBIS, "upgrade", "-c", str(config)], capture_stdout=True,
                                            capture_stderr=True, check=False)  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert f"sent SIGUSR2 to process {old.pid}".encode() in result.stdout
            await wait_until(lambda: read_pid(pid_file) not in (None, old.pid))
            new = read_pid(pid_file)
            assert new is not None
            await wait_for_log(log, f"upgrade: pid {new} serves now")
            await held.send_all(b"during")  # the old process still carries it
            assert await held.receive_some(6) == b"during"
            await clients.run_until(50)
            await held.aclose()
            with trio.fail_after(EVENTUALLY):
                await old.wait()  # its drain ended with its last connection
            assert old.returncode == 0
            assert all(gone(pid) for pid in old_workers)
            await clients.run_until(AFTER)  # the new process alone
            loops.cancel_scope.cancel()
        assert clients.failures == []
        assert clients.done >= 200
        assert Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"trioanubis", b"run"]
        stats = await admin_json(admin, "/stats")  # the admin endpoint came along
        if workers > 1:
            now = [w["pid"] for w in stats["workers"]]
            assert len(now) == workers and not set(now) & set(old_workers)
            assert all(w["serving"] for w in stats["workers"])
        os.kill(new, signal.SIGTERM)
        await wait_until(lambda: gone(new))


@pytest.mark.slow
async def test_an_upgrade_refuses_no_connection_and_the_old_process_drains_and_exits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    await upgrade_under_load(tmp_path, nursery, workers=1)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need a Unix")
async def test_the_supervisor_upgrades_with_its_workers_and_refuses_no_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    await upgrade_under_load(tmp_path, nursery, workers=2)


@pytest.mark.slow
async def test_an_upgrade_whose_new_process_cannot_start_leaves_the_old_one_serving(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    pid_file = write_config(config, port, admin, backend.address)
    log = tmp_path / "anubis.log"
    address = Address("127.0.0.1", port)
    async with upgradable(config, log, pid_file) as old:
        await wait_until(lambda: read_pid(pid_file) == old.pid)
        good = config.read_text()
        config.write_text(good.replace('pool = "web"', 'pool = "nowhere"'))  # invalid meanwhile
        refused = run_cli("upgrade", "-c", str(config))
        assert refused.returncode == 1 and "nowhere" in refused.stderr  # checked first: nothing sent
        clients = Clients(address)
        async with trio.open_nursery() as loops:
            for k in range(2):
                loops.start_soon(clients.loop, k)
            await clients.run_until(20)
            old.send_signal(signal.SIGUSR2)  # as a `kill -USR2` would, without the check
            content = await wait_for_log(log, "upgrade failed, this process")
            assert "exited with status 1 before it served" in content
            assert "names pool 'nowhere'" in content  # the new process's own line says why
            await clients.run_until(50)
            loops.cancel_scope.cancel()
        assert clients.failures == []
        assert read_pid(pid_file) == old.pid and old.returncode is None
        config.write_text(good)  # fixed: the next upgrade goes through
        old.send_signal(signal.SIGUSR2)
        await wait_until(lambda: read_pid(pid_file) not in (None, old.pid))
        new = read_pid(pid_file)
        assert new is not None
        with trio.fail_after(EVENTUALLY):
            await old.wait()
        await echo_round_trip(address, b"served by the new one")
        os.kill(new, signal.SIGTERM)
        await wait_until(lambda: gone(new))


# ---------------------------------------------------------- the hand-over


SUCCESSOR = """
import json, os, socket, sys
fds = int(os.environ["LISTEN_FDS"])
report = int(os.environ["ANUBIS_UPGRADE_FD"])
seen = {"pid": os.getpid(), "listen_pid": int(os.environ["LISTEN_PID"]), "fds": fds,
        "names": os.environ["LISTEN_FDNAMES"], "report": report,
        "ports": [socket.socket(fileno=3 + i).getsockname()[1] for i in range(fds)]}
open(sys.argv[1], "w").write(json.dumps(seen))
mode = sys.argv[2]
if mode == "ready":
    os.write(report, b"STATUS=x\\nREADY=1\\n")
elif mode == "fail":
    sys.exit(3)
else:
    import time; time.sleep(60)
"""


async def run_successor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                        timeout: float = EVENTUALLY) -> tuple[int | str, dict[str, Any]]:  # fmt: skip
    """start_successor with a stand-in command (the script above) on two listening sockets."""
    script, seen = tmp_path / "successor.py", tmp_path / "seen.json"
    script.write_text(SUCCESSOR)
    monkeypatch.setattr(upgrade, "successor_argv", lambda: [sys.executable, str(script), str(seen), mode])
    with socket.create_server(("127.0.0.1", 0)) as one, socket.create_server(("127.0.0.1", 0)) as two:
        ports = [one.getsockname()[1], two.getsockname()[1]]
        try:
            sockets = [("web", one.fileno()), ("anubis.admin", two.fileno())]
            outcome: int | str = await start_successor(sockets, timeout)
        except UpgradeFailed as exc:
            outcome = str(exc)
    doc = json.loads(seen.read_text()) if seen.exists() else {}
    assert doc.get("ports", ports) == ports
    return outcome, doc


@pytest.mark.slow
async def test_the_successor_gets_the_sockets_on_3_and_on_with_its_own_pid_and_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid, seen = await run_successor(tmp_path, monkeypatch, "ready")
    assert seen["pid"] == seen["listen_pid"] == pid  # the wrapper's $$ is the pid the command keeps
    assert (seen["fds"], seen["names"], seen["report"]) == (2, "web:anubis.admin", 5)
    assert isinstance(pid, int)
    await wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid)  # it exits after its report: reap it


@pytest.mark.slow
async def test_a_successor_that_exits_or_never_reports_is_a_failed_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, _ = await run_successor(tmp_path, monkeypatch, "fail")
    assert isinstance(outcome, str) and "exited with status 3 before it served" in outcome
    outcome, seen = await run_successor(tmp_path, monkeypatch, "hang", timeout=1)
    assert isinstance(outcome, str) and "did not serve within 1s; it was stopped" in outcome
    assert gone(seen["pid"])  # stopped and reaped


@pytest.mark.slow
def test_the_successor_environment_names_the_sockets_and_drops_ours() -> None:
    env = {"PATH": "/bin", "LISTEN_PID": "1", "LISTEN_FDS": "9", "NOTIFY_SOCKET": "@old",
           "ANUBIS_UPGRADE_FD": "7"}  # fmt: skip
    out = successor_environment(env, ["web", "api", "a:b"], "@systemd")
    assert out == {"PATH": "/bin", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:api:", "ANUBIS_UPGRADE_FD": "6",
                   "NOTIFY_SOCKET": "@systemd"}  # fmt: skip


@pytest.mark.slow
@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_only_a_ready_line_is_a_report_of_ready(report: bytes) -> None:
    assert is_ready(report) == (b"READY=1" in report.splitlines())
    assert is_ready(b"STATUS=starting\n" + report + b"\nREADY=1\n")
    assert not is_ready(report.replace(b"READY=1", b"READY=0"))


async def test_the_new_process_reports_ready_on_the_descriptor_its_predecessor_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    monkeypatch.setenv("ANUBIS_UPGRADE_FD", str(write_end))
    predecessor = upgrade.Predecessor.claim()
    assert predecessor is not None and "ANUBIS_UPGRADE_FD" not in os.environ
    assert not os.get_inheritable(write_end)  # no worker or replica inherits it
    upgrade.announce_ready(predecessor, "serving")
    assert os.read(read_end, 100) == b"READY=1\n"
    assert os.read(read_end, 100) == b""  # and closed it
    os.close(read_end)
    for bad in ("x", "1", "-5", "99999"):
        monkeypatch.setenv("ANUBIS_UPGRADE_FD", bad)
        assert upgrade.Predecessor.claim() is None


@pytest.mark.slow
async def test_sigusr2_to_a_command_that_does_not_upgrade_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "anubis.log"
    command = [*ANUBIS, "proxy", f"127.0.0.1:{free_port()}", "127.0.0.1:9"]
    async with process_logging_to(command, log) as proxy:
        await wait_for_log(log, "INFO    ready")
        proxy.send_signal(signal.SIGUSR2)
        await wait_for_log(log, "received SIGUSR2: this command does not upgrade; ignored")
        assert proxy.returncode is None
        proxy.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await proxy.wait()
    assert proxy.returncode == 0


@pytest.mark.slow
async def test_a_stop_during_an_upgrade_stops_the_new_process_too(monkeypatch: pytest.MonkeyPatch) -> None:
    child = await trio.lowlevel.open_process([sys.executable, "-c", "import time; time.sleep(60)"])
    state = {"stopping": False, "stepped_down": False}

    async def started(sockets: object) -> int:
        state["stopping"] = True  # SIGTERM arrived while the new process was starting
        return child.pid

    def step_down() -> None:
        state["stepped_down"] = True

    monkeypatch.setattr(upgrade, "start_successor", started)
    upgrader = upgrade.Upgrader(lambda: [], step_down, lambda: state["stopping"])
    try:
        await upgrader.upgrade()
        with trio.fail_after(EVENTUALLY):
            await child.wait()
        assert child.returncode == -signal.SIGTERM and not state["stepped_down"]
        await upgrader.upgrade()  # and a SIGUSR2 while stopping is ignored
        assert not state["stepped_down"]
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_an_upgrade_that_runs_out_of_descriptors_is_logged_and_the_process_serves_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_pipe)
    stepped_down = []
    upgrader = upgrade.Upgrader(lambda: [], lambda: stepped_down.append(1), lambda: False)
    await upgrader.upgrade()  # nothing raised into the caller's nursery
    assert not stepped_down and not upgrader.busy
    assert "upgrade failed, this process" in caplog.text and "Too many open files" in caplog.text
