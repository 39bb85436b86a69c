"""`anubis top`: pure rendering, the plain snapshot in a subprocess, the live screen in tmux."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import EVENTUALLY, echo_handler, free_port, running_balancer, start_backend
from tests.helpers import TOKEN, two_servers
from tests.peers import need
from trioanubis.config import parse_config
from trioanubis.ops.top import (
    TopError,
    admin_target,
    admin_url,
    parse_keys,
    rates,
    read_token_file,
    render,
    server_rows,
)

pytest.importorskip("rich")

ANUBIS = [sys.executable, "-m", "trioanubis"]


def stats_document(**server_extra: Any) -> dict[str, Any]:
    server = {"name": "alpha", "address": "127.0.0.1:1", "state": "up", "weight": 2, "effective_weight": 1.0,
              "active": 1, "total": 5, "bytes_in": 2048, "bytes_out": 10, "connect_failures": 0,
              "last_check": "connected", "ewma_ms": 0.25, "max_connections": 0, **server_extra}  # fmt: skip
    return {"ready": True, "active": 1,
            "listeners": [{"name": "web", "bind": "127.0.0.1:80", "pool": "p", "accepted": 5}],
            "pools": [{"name": "p", "strategy": "round_robin", "servers": [server],
                       "retired": [{"name": "old", "state": "draining"}]}]}  # fmt: skip


def screen(renderable: Any) -> str:
    from rich.console import Console

    with open(os.devnull, "w") as sink:
        console = Console(width=200, record=True, no_color=True, file=sink)
        console.print(renderable)
        return console.export_text()


@pytest.mark.slow
def test_rows_show_unknown_fields_and_retired_servers() -> None:
    rows = server_rows(stats_document(priority=2, zone="b"))
    assert [(r.name, r.state) for r in rows] == [("alpha", "up"), ("old", "draining (retired)")]
    assert rows[0].extras == "priority=2  zone=b"
    text = screen(render(stats_document(priority=2), rows, selected=0, status="hello"))
    for expected in ("alpha", "2.0 KiB", "priority=2", "draining (retired)", "q quit", "hello", "2 (1)"):
        assert expected in text, expected


def test_rates_and_keys() -> None:
    before = server_rows(stats_document(total=5))
    after = server_rows(stats_document(total=9))
    assert rates(before, after, 2.0)[("p", "alpha")] == 2.0
    assert rates(after, before, 2.0)[("p", "alpha")] == 0  # a reload reset the counter
    assert parse_keys("jd\x1b[Ak\x1b[Bxeq") == ["down", "drain", "up", "up", "down", "enable", "quit"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"pools": st.lists(st.fixed_dictionaries(
            {"servers": st.lists(st.dictionaries(st.sampled_from(["name", "state", "weight", "total",
                                                                  "effective_weight", "x"]), json_values),
                                 max_size=3)},
            optional={"name": json_values, "retired": json_values}), max_size=2)},
        optional={"listeners": json_values, "ready": json_values, "active": json_values},
    )
)  # fmt: skip
def test_fuzz_any_stats_document_renders(document: dict[str, Any]) -> None:
    rows = server_rows(document)
    rates(rows, rows, 1.0)
    screen(render(document, rows, selected=0))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(max_size=30).map(lambda s: "http://127.0.0.1:" + s)))
def test_fuzz_admin_url_is_a_clear_error_or_an_http_url(text: str) -> None:
    try:
        url = admin_url(text)
    except TopError as exc:
        assert str(exc).startswith("--admin ")
    else:
        assert url.startswith(("http://", "https://"))


def test_admin_target_from_config() -> None:
    data = two_servers("127.0.0.1:1", "127.0.0.1:2", TOKEN)
    data["admin"]["bind"] = "0.0.0.0:9911"
    assert admin_target(parse_config(data, "t.toml")) == ("http://127.0.0.1:9911", TOKEN)
    data["admin"]["bind"] = "[::]:9911"
    assert admin_target(parse_config(data, "t.toml"))[0] == "http://[::1]:9911"


def run_top(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANUBIS, "top", *args], capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.slow
async def test_an_admin_that_does_not_speak_http_is_one_line(nursery: trio.Nursery) -> None:
    echo = await start_backend(nursery, echo_handler)  # answers the request with itself
    done = await trio.to_thread.run_sync(lambda: run_top("--admin", f"http://{echo.address}"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("anubis: ") and "did not answer like an admin" in done.stderr, done.stderr


@pytest.mark.slow
async def test_snapshot_when_stdout_is_not_a_terminal(nursery: trio.Nursery) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        b.pools["test"].set_draining(b.pools["test"].servers[1], True)
        url = f"http://{admin.host}:{admin.port}"
        done = await trio.to_thread.run_sync(lambda: run_top("--admin", url, "--token", TOKEN))
        refused = await trio.to_thread.run_sync(lambda: run_top("--admin", url, "--token", "wrong"))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout, "a snapshot is plain text"
    lines = done.stdout.splitlines()
    assert any("alpha" in line and " up " in line for line in lines), done.stdout
    assert any("beta" in line and "draining" in line for line in lines), done.stdout
    assert refused.returncode == 1 and "refused the token" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_unreachable_admin_and_missing_rich_are_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    unreachable = run_top("--admin", url)
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert unreachable.stderr.startswith(f"anubis: cannot reach the admin endpoint at {url}")
    no_rich = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['rich'] = None; from trioanubis.cli import main; "
         f"sys.exit(main(['top', '--admin', {url!r}]))"],
        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_rich.returncode == 1 and "Traceback" not in no_rich.stderr
    assert "pip install 'trioanubis[top]'" in no_rich.stderr
    for bad in ("ftp://x", "http://127.0.0.1:99999", "http://[::1", "http://127.0.0.1:9 9"):
        refused = run_top("--admin", bad)
        assert refused.returncode == 1 and refused.stderr.startswith("anubis: --admin "), refused.stderr
    config = tmp_path / "no-admin.toml"
    config.write_text('[listeners.a]\nbind = "127.0.0.1:0"\npool = "p"\n'
                      '[pools.p]\nservers = ["127.0.0.1:1"]\n')
    no_admin = run_top("-c", str(config))
    assert no_admin.returncode == 1 and "no [admin] table" in no_admin.stderr


class Tmux:
    """A private tmux server (its own socket in the test's tmp dir) holding one fixed-size window."""

    def __init__(self, tmux: str, socket: Path) -> None:
        self.base = [tmux, "-S", str(socket)]

    async def run(self, *args: str, check: bool = True) -> str:
        # COLUMNS/LINES from pytest's terminal would override the window's fixed size for rich.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        result = await trio.run_process([*self.base, *args], capture_stdout=True, capture_stderr=True,
                                        env=env, check=check)  # fmt: skip
        return result.stdout.decode()

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", "top", check=False)

    async def wait_for(self, predicate: Any, what: str) -> str:
        with trio.move_on_after(EVENTUALLY):
            while True:
                text = await self.screen()
                if predicate(text):
                    return text
                await trio.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; the screen:\n{await self.screen()}")


def row(text: str, name: str) -> str:
    return next((line for line in text.splitlines() if f" {name} " in line), "")


@pytest.mark.slow
async def test_top_in_tmux_lists_servers_drains_and_quits(nursery: trio.Nursery, tmp_path: Path) -> None:
    tmux = Tmux(need("tmux"), tmp_path / "tmux.sock")
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        pool = b.pools["test"]
        beta.stop()
        url = f"http://{admin.host}:{admin.port}"
        # tmux does not always learn the pane's exit status (pane_dead_status stays empty when it
        # sees the terminal close first), so the pane's shell writes it down.
        exit_file = tmp_path / "exit-status"
        exit_file.write_text("")
        top = shlex.join([*ANUBIS, "top", "--admin", url, "--token", TOKEN])
        command = f"{top}; echo $? > {shlex.quote(str(exit_file))}"
        await tmux.run("new-session", "-d", "-s", "top", "-x", "150", "-y", "40", command)
        try:
            await tmux.wait_for(lambda s: " up " in row(s, "alpha") and " down " in row(s, "beta"),
                                "alpha up and beta down on the screen")  # fmt: skip
            await tmux.run("send-keys", "-t", "top", "d")  # the first row (alpha) is selected
            await tmux.wait_for(lambda s: "draining" in row(s, "alpha"), "alpha draining")
            assert pool.servers[0].draining
            await tmux.run("send-keys", "-t", "top", "j", "e", "d")  # beta: enable is a no-op, then drain
            await tmux.wait_for(lambda s: "draining" in row(s, "beta"), "beta draining")
            assert pool.servers[1].draining
            await tmux.run("send-keys", "-t", "top", "k", "e")
            await tmux.wait_for(lambda s: " up " in row(s, "alpha"), "alpha enabled again")
            await tmux.run("send-keys", "-t", "top", "q")
            # tmux may see the pane's terminal close before it reaps the process: wait for both.
            with trio.move_on_after(EVENTUALLY):
                while not exit_file.read_text().strip():
                    await trio.sleep(0.1)
            assert exit_file.read_text().strip() == "0", f"top ended; screen:\n{await tmux.screen()}"
        finally:
            await tmux.run("kill-server", check=False)  # gone already once top has quit


# ------------------------------------------------------------ the token, off the command line


@pytest.mark.slow
@pytest.mark.parametrize("source", ["environment", "file", "config"])
async def test_top_in_tmux_takes_the_token_from_the_environment_or_a_file_not_the_command_line(
    nursery: trio.Nursery, tmp_path: Path, source: str
) -> None:
    """The token reaches the admin (servers are listed, no 401) while no command line shows it."""
    tmux = Tmux(need("tmux"), tmp_path / "tmux.sock")
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        url = f"http://{admin.host}:{admin.port}"
        token_file = tmp_path / "token"
        token_file.write_text(f"  {TOKEN}\n")  # surrounding whitespace is not part of it
        environment: list[str] = []
        if source == "environment":
            arguments = ["--admin", url]
            environment = ["-e", f"ANUBIS_TOKEN={TOKEN}"]
        elif source == "file":
            arguments = ["--admin", url, "--token-file", str(token_file)]
        else:  # the config's token_file, the config given as the argument
            config = tmp_path / "anubis.toml"
            config.write_text(f'[admin]\nbind = "{admin.host}:{admin.port}"\ntoken_file = "{token_file}"\n'
                              '[listeners.x]\nbind = "127.0.0.1:1"\npool = "p"\n'
                              '[pools.p]\nservers = ["127.0.0.1:1"]\n')  # fmt: skip
            arguments = [str(config)]
        command = "exec " + shlex.join([*ANUBIS, "top", *arguments])  # the pane's process is top itself
        await tmux.run("new-session", "-d", "-s", "top", "-x", "150", "-y", "40", *environment, command)
        try:
            await tmux.wait_for(lambda s: " up " in row(s, "alpha") and " up " in row(s, "beta"),
                                "alpha and beta listed up (the token was accepted)")  # fmt: skip
            pid = int((await tmux.run("list-panes", "-t", "top", "-F", "#{pane_pid}")).strip())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"trioanubis\x00top" in command_line
            assert TOKEN.encode() not in command_line  # what `ps` shows every user
            await tmux.run("send-keys", "-t", "top", "q")
        finally:
            await tmux.run("kill-server", check=False)


@pytest.mark.slow
async def test_the_token_sources_in_order_and_their_errors_are_one_line(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    alpha = await start_backend(nursery, echo_handler, "alpha")
    beta = await start_backend(nursery, echo_handler, "beta")
    async with running_balancer(two_servers(alpha.address, beta.address, TOKEN)) as (b, _):
        admin = b.admin_address
        assert admin is not None
        url = f"http://{admin.host}:{admin.port}"
        good, empty = tmp_path / "good", tmp_path / "empty"
        good.write_text(TOKEN)
        empty.write_text(" \n")
        environment = {**os.environ, "ANUBIS_TOKEN": "wrong"}

        def top(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return run_top("--admin", url, *args, env=env)

        file_first = await trio.to_thread.run_sync(lambda: top("--token-file", str(good), env=environment))
        env_only = await trio.to_thread.run_sync(lambda: top(env=environment))
        token_first = await trio.to_thread.run_sync(lambda: top("--token", TOKEN, env=environment))
        missing = await trio.to_thread.run_sync(lambda: top("--token-file", str(tmp_path / "none")))
        blank = await trio.to_thread.run_sync(lambda: top("--token-file", str(empty)))
        both = await trio.to_thread.run_sync(lambda: top("--token-file", str(good), "--token", TOKEN))
    assert file_first.returncode == 0 and "alpha" in file_first.stdout, file_first.stderr
    assert token_first.returncode == 0, token_first.stderr
    assert env_only.returncode == 1 and "refused the token (401); set $ANUBIS_TOKEN" in env_only.stderr
    assert missing.returncode == 1
    assert missing.stderr == f"anubis: --token-file {tmp_path / 'none'}: not a readable regular file\n"
    assert blank.returncode == 1 and blank.stderr.startswith(f"anubis: --token-file {empty}: must hold one")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    for result in (file_first, env_only, missing, blank):
        assert "Traceback" not in result.stderr


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_fuzz_a_token_file_gives_a_token_or_one_clear_error(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "token"
        path.write_bytes(content)
        try:
            token = read_token_file(str(path))
        except TopError as exc:
            assert str(exc).startswith(f"--token-file {path}: ") and "\n" not in str(exc)
        else:
            assert token == content.decode("ascii").strip() and token.isprintable() and " " not in token
