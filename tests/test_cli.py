"""The real `anubis` command in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import IO_BACKEND, free_port, name_handler, start_backend
from tests.helpers import ANUBIS, ROOT, anubis, http_get, process_stderr, run_cli
from trioanubis.cli import build_parser, parse_arguments, version_line
from trioanubis.proxy.io import epoll_available


@pytest.mark.slow
def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == version_line()


@pytest.mark.slow
def test_check_accepts_the_shipped_config_and_summarises_it() -> None:
    result = run_cli("check", "-c", "anubis.toml")
    assert result.returncode == 0, result.stderr
    assert "anubis.toml: ok" in result.stdout
    assert "listener web: :8000 -> pool web" in result.stdout
    assert "server web2: 127.0.0.1:9002 weight 1" in result.stdout


@pytest.mark.slow
def test_check_into_a_closed_pipe_ends_quietly() -> None:
    """`anubis check | head -1`: the reader left; no BrokenPipeError traceback, the shell's 141."""
    process = subprocess.Popen([*ANUBIS, "check", "-c", "anubis.toml"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the interpreter has even started: every write fails
    with process.stderr:
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.slow
def test_reload_does_not_signal_a_stranger_named_by_a_stale_pid_file(tmp_path: Path) -> None:
    """After a kill -9 the pid file stays; its number may be another program's by now."""
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        pid_file = tmp_path / "anubis.pid"
        pid_file.write_text(f"{stranger.pid}\n")
        config = tmp_path / "anubis.toml"
        config.write_text(f'[settings]\npid_file = "{pid_file}"\n[listeners.web]\nbind = "127.0.0.1:1"\n'
                          'pool = "web"\n[pools.web]\nservers = ["127.0.0.1:2"]\n')  # fmt: skip
        result = run_cli("reload", "-c", str(config))
        assert result.returncode == 1
        assert "is not anubis (a stale pid file?)" in result.stderr
        assert stranger.poll() is None  # still running: never signalled
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.slow
def test_check_rejects_bad_config_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = (ROOT / "anubis.toml").read_text().replace('strategy = "round_robin"', 'strategy = 7')
    bad.write_text(text)
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"{bad}: pools.web.strategy: must be a string, got 7")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_with_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("run", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 1
    assert "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("proxy", f"127.0.0.1:{port}", "127.0.0.1:1")
    assert result.returncode == 1
    assert f"binding 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_proxy_answers_a_real_request(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port = free_port()
    async with anubis("proxy", f"127.0.0.1:{port}", one.address, two.address):
        answers = {await http_get(port) for _ in range(4)}
    assert answers == {b"one", b"two"}


def demo_config(tmp_path: Path) -> tuple[Path, list[int]]:
    """The reference config on free ports: listener, three backends, admin."""
    ports = [free_port() for _ in range(5)]
    text = (ROOT / "anubis.toml").read_text().replace('":8000"', f'"127.0.0.1:{ports[0]}"')
    for i, port in enumerate(ports[1:4], start=1):
        text = text.replace(f"127.0.0.1:900{i}", f"127.0.0.1:{port}")
    assert 'bind = "127.0.0.1:9900"' in text  # the demo has an admin endpoint, on loopback
    text = text.replace("127.0.0.1:9900", f"127.0.0.1:{ports[4]}")
    config = tmp_path / "demo.toml"
    config.write_text(text)
    return config, ports


async def _read_stdout_until(process: trio.Process, needle: bytes) -> bytes:
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(30):
        while needle not in seen:
            data = await process.stdout.receive_some()
            assert data, f"stdout ended before {needle!r}: {seen!r}"
            seen += data
    return seen


@pytest.mark.slow
async def test_demo_answers_hello_and_health_and_points_at_the_dashboard_and_top(tmp_path: Path) -> None:
    config, ports = demo_config(tmp_path)
    async with anubis("demo", "-c", str(config)) as process:
        answers = {await http_get(ports[0]) for _ in range(3)}
        health = await http_get(ports[0], "/health")
        banner = (await _read_stdout_until(process, b"anubis top")).decode()
        dashboard = await http_get(ports[4], "/")  # no token: the admin is on loopback
        metrics = await http_get(ports[4], "/metrics")
    bodies = {a.split(b"\r\n\r\n", 1)[1] for a in answers}
    assert bodies == {b"hello from web1\n", b"hello from web2\n", b"hello from web3\n"}
    assert health.startswith(b"HTTP/1.1 200 OK\r\n") and health.endswith(b"up\n")
    assert "curl http://127.0.0.1:" in banner
    assert f"dashboard: http://127.0.0.1:{ports[4]}/" in banner
    assert f"anubis top --admin http://127.0.0.1:{ports[4]}" in banner
    assert dashboard.startswith(b"HTTP/1.1 200 ") and b"<html" in dashboard.lower()
    assert metrics.startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
async def test_sigterm_exits_zero_after_draining(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("x"))
    port = free_port()
    async with anubis("proxy", f"127.0.0.1:{port}", backend.address) as process:
        assert await http_get(port) == b"x"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert process.returncode == 0


@pytest.mark.slow
def test_python_dash_m_and_console_script_agree() -> None:
    script = Path(sys.executable).with_name("anubis")
    if not script.exists():
        pytest.skip("the console script is only installed by pip install")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ})  # fmt: skip
    assert result.stdout.strip() == version_line()


@pytest.mark.slow
@pytest.mark.parametrize("io", ["epoll", "portable"])
async def test_proxy_runs_on_the_backend_io_names_and_logs_it(nursery: trio.Nursery, io: str) -> None:
    if io == "epoll" and not epoll_available():
        pytest.skip("no epoll here")
    backend = await start_backend(nursery, name_handler("either"))
    port = free_port()
    async with anubis("proxy", f"127.0.0.1:{port}", backend.address, "--io", io) as process:
        assert await http_get(port) == b"either"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
        assert f"(io: {io})" in await process_stderr(process)


@pytest.mark.slow
def test_check_names_the_backend_in_use() -> None:
    result = run_cli("check", "-c", "anubis.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"io: {IO_BACKEND}"


def test_every_command_is_in_the_readme_table() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `anubis ")]
    for name in commands:
        assert any(line.startswith(f"| `anubis {name}") for line in table), f"{name} is not in the README"


@pytest.mark.slow
def test_global_options_work_on_either_side_of_the_command() -> None:
    with socket.socket() as taken:  # the balancer logs "starting" at info, then fails to bind: quick
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        quiet_after = run_cli("proxy", listen, "127.0.0.1:1", "--log-level", "warning")
        quiet_before = run_cli("--log-level", "warning", "proxy", listen, "127.0.0.1:1")
        after_wins = run_cli("--log-level", "warning", "proxy", "--log-level", "info", listen, "127.0.0.1:1")
        default = run_cli("proxy", listen, "127.0.0.1:1")
    for result in (quiet_after, quiet_before, after_wins, default):
        assert result.returncode == 1 and "Address already in use" in result.stderr, result.stderr
    assert "starting anubis" not in quiet_after.stderr + quiet_before.stderr
    assert "starting anubis" in after_wins.stderr and "starting anubis" in default.stderr
    debug = run_cli("run", "--log-level", "debug", "-c", "missing.toml")
    assert "unrecognized arguments" not in debug.stderr and "cannot read the config file" in debug.stderr
    assert run_cli("check", "--version").stdout.strip() == version_line()


@pytest.mark.slow
def test_proxy_argument_errors_name_the_argument_and_show_an_example() -> None:
    example = "Example: anubis proxy :8000 localhost:3000"
    listen = run_cli("proxy", "8000", "localhost:3000")
    assert listen.returncode == 1
    assert listen.stderr.startswith('anubis: LISTEN "8000": must be "host:port" (the port is missing).')
    assert 'Did you mean ":8000"' in listen.stderr and example in listen.stderr
    server = run_cli("proxy", ":8000", "localhost:3000", "localhost")
    assert server.returncode == 1
    assert server.stderr.startswith('anubis: SERVER "localhost": must be "host:port"')
    assert example in server.stderr
    port = run_cli("proxy", ":8000", "localhost:0")
    assert port.stderr.startswith('anubis: SERVER "localhost:0": the port must be a number from 1 to 65535')
    forged = run_cli("proxy", ":8000", "localhost:1\nanubis: forged")  # one line, escaped
    assert forged.returncode != 0 and forged.stderr.count("\n") == 1, forged.stderr
    assert forged.stderr.startswith('anubis: SERVER "localhost:1\\nanubis: forged": '), forged.stderr
    for result in (listen, server, port):
        assert "listeners.proxy" not in result.stderr and "pools.proxy" not in result.stderr
        assert "Traceback" not in result.stderr
    usage = run_cli("proxy")
    assert "LISTEN [SERVER ...]" in usage.stderr


@pytest.mark.slow
async def test_hello_sends_reason_phrases_and_binds_loopback_only_by_default() -> None:
    port = free_port()
    async with anubis("hello", "--name", "dev", "--port", str(port)):
        answer = await http_get(port)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello from dev\n")
        with pytest.raises(OSError):  # 127.0.0.2 is this machine too, but not 127.0.0.1
            await (await trio.open_tcp_stream("127.0.0.2", port)).aclose()


@pytest.mark.slow
def test_check_summary_shows_settings_and_the_admin_endpoint_but_never_the_token(tmp_path: Path) -> None:
    config = tmp_path / "anubis.toml"
    text = (ROOT / "anubis.toml").read_text()
    text = text.replace('drain_timeout = "30s"', 'drain_timeout = "45s"\nworkers = 2')
    text = text.replace('bind = "127.0.0.1:9900"', 'bind = "127.0.0.1:9911"\ntoken = "s3cret-token"')
    config.write_text(text.replace('log_format = "text"', 'log_format = "json"')
                      .replace("access_log = true", "access_log = false"))  # fmt: skip
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = ("settings: drain_timeout 45s, log_format json, access_log off, "
                "max_connections from ulimit -n, workers 2")
    assert expected in lines
    assert "admin: 127.0.0.1:9911, token required" in lines
    assert "s3cret-token" not in result.stdout + result.stderr
    reference = run_cli("check", "-c", "anubis.toml")
    assert "admin: 127.0.0.1:9900, no token" in reference.stdout.splitlines()  # the demo's, on loopback


# Configs `check` accepted before and `run` or a reload then crashed on: each is refused now,
# naming the key path, on one line, without a traceback.
FORMER_CRASHES = [
    ('path = "/health"', 'path = "/health x"', "pools.web.health.path: must be visible ASCII"),
    ('path = "/health"', 'path = "/health\\r\\nX: 1"', "pools.web.health.path: must be visible ASCII"),
    ('path = "/health"', 'path = "/health"\nhost = "bad host"', "pools.web.health.host: 'bad host'"),
    ('"127.0.0.1:9001"', '"a..b:80"', "pools.web.servers[0].address: 'a..b' is not a valid host name"),
    ('":8000"', f'"{"x" * 64}:80"', "listeners.web.bind: "),
    ('interval = "2s"', "interval = nan", "pools.web.health.interval: must be a finite duration"),
    ('timeout = "1s"', "timeout = nan", "pools.web.health.timeout: must be a finite duration"),
    ('drain_timeout = "30s"', "drain_timeout = nan", "settings.drain_timeout: must be a finite duration"),
    ('connect_timeout = "3s"', "connect_timeout = nan", "pools.web.connect_timeout: must be a finite"),
    ('strategy = "round_robin"', 'strategy = "trioanubis.strategies.base:Strategy"',
     "pools.web.strategy: trioanubis.strategies.base:Strategy is a typing.Protocol"),
]  # fmt: skip


def _check_text(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "anubis.toml"
    config.write_text(text)
    return run_cli("check", "-c", str(config))


@pytest.mark.slow
@pytest.mark.parametrize(("old", "new", "expected"), FORMER_CRASHES)
def test_check_refuses_what_used_to_crash_run(tmp_path: Path, old: str, new: str, expected: str) -> None:
    reference = (ROOT / "anubis.toml").read_text()
    assert old in reference
    result = _check_text(tmp_path, reference.replace(old, new, 1))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"anubis: {tmp_path / 'anubis.toml'}: {expected}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nested", "fifo", "dev_zero", "huge"])
def test_check_refuses_hostile_files_with_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "anubis.toml"
    if kind == "nested":
        path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
        expected = "invalid TOML: "
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)
        expected = "cannot read the config file: not a regular file"
    elif kind == "dev_zero":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero on this platform")
        path = Path("/dev/zero")
        expected = "cannot read the config file: not a regular file"
    else:
        path.write_text("#" * (3 << 20))
        expected = "cannot read the config file: larger than 1024 KiB"
    # A FIFO read would hang (run_cli times out); /dev/zero would be read until memory runs out.
    result = run_cli("check", "-c", str(path), memory=2 << 30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"anubis: {path}: {expected}") and result.stderr.count("\n") == 1


MYSTRAT = '''
class FirstUsable:
    """Always the first usable server: easy to tell apart from round robin."""

    def pick(self, servers, client_key, usable):
        return next((s for s in servers if usable(s)), None)
'''


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_strategy_module_beside_the_config_is_found(
    tmp_path: Path, nursery: trio.Nursery, workers: int
) -> None:
    """Found by `check`, by a single process, and by a supervisor and its workers (which parse the text)."""
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port = free_port()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mystrat.py").write_text(MYSTRAT)
    config = tmp_path / "conf" / "anubis.toml"
    config.write_text(f'[settings]\nworkers = {workers}\n'
                      f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n[pools.web]\n'
                      f'strategy = "mystrat:FirstUsable"\nservers = ["{one.address}", "{two.address}"]\n')
    assert "mystrat" not in os.environ.get("PYTHONPATH", "")
    checked = run_cli("check", "-c", str(config))  # run from the repository, not the config's folder
    assert checked.returncode == 0, checked.stderr
    assert "pool web: mystrat:FirstUsable" in checked.stdout
    async with anubis("run", "-c", str(config), cwd=ROOT):
        answers = [await http_get(port) for _ in range(4)]
    assert answers == [b"one"] * 4


async def _read_until(process: trio.Process, needle: bytes, seen: bytearray) -> None:
    """Read the process's stderr into `seen` until `needle` appears after what was there before."""
    assert process.stderr is not None
    start = len(seen)
    with trio.fail_after(30):
        while needle not in seen[start:]:
            data = await process.stderr.receive_some()
            assert data, f"stderr ended before {needle!r}: {seen.decode(errors='replace')}"
            seen += data


@pytest.mark.slow
async def test_reload_refuses_what_used_to_crash_and_keeps_serving(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await start_backend(nursery, name_handler("x"))
    port = free_port()
    config = tmp_path / "anubis.toml"
    good = (f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
            f'[pools.web]\nservers = ["{backend.address}"]\n')  # fmt: skip
    config.write_text(good)
    stderr = bytearray()
    async with anubis("run", "-c", str(config)) as process:
        assert await http_get(port) == b"x"
        for text, expected in [
            (good + '[pools.web.health]\ncheck = "http"\npath = "/health x"\n',
             b"reload rejected, the running config stays: " + bytes(config) + b": pools.web.health.path"),
            ("x = " + "[" * 5000 + "]" * 5000 + "\n", b"reload rejected, the running config stays: "
             + bytes(config) + b": invalid TOML: "),
            (good.replace(backend.address, "a..b:80"), b"pools.web.servers[0].address: 'a..b'"),
        ]:
            config.write_text(text)
            process.send_signal(signal.SIGHUP)
            await _read_until(process, expected, stderr)
            assert await http_get(port) == b"x"
    assert b"Traceback" not in stderr


@pytest.mark.slow
def test_check_refuses_two_listeners_on_one_port_written_differently(tmp_path: Path) -> None:
    text = (ROOT / "anubis.toml").read_text().replace('bind = ":8000"', 'bind = ":31840"')
    result = _check_text(tmp_path, text + '\n[listeners.api]\nbind = "0.0.0.0:31840"\npool = "web"\n')
    assert result.returncode == 1
    assert result.stderr == (f'anubis: {tmp_path / "anubis.toml"}: listeners.api.bind: overlaps '
                             'listeners.web.bind = ":31840" on port 31840: the same address, '
                             'got "0.0.0.0:31840"\n')  # fmt: skip


@pytest.mark.slow
def test_check_takes_a_resolver_without_a_port_as_port_53(tmp_path: Path) -> None:
    text = (ROOT / "anubis.toml").read_text().replace('# resolver = ""', 'resolver = "127.0.0.1"', 1)
    result = _check_text(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "resolver 127.0.0.1:53" in result.stdout.splitlines()[1]


# ------------------------------------------------ the config file as an argument, help, completion

CONFIG_COMMANDS = ["run", "check", "reload", "demo", "top"]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_the_config_file_may_be_given_as_the_argument(command: str) -> None:
    assert parse_arguments([command, "lb.toml"]).config == "lb.toml"
    assert parse_arguments([command, "-c", "lb.toml"]).config == "lb.toml"
    assert parse_arguments([command, "lb.toml", "--config", "lb.toml"]).config == "lb.toml"  # the same: fine
    assert parse_arguments([command]).config == (None if command == "top" else "anubis.toml")
    assert parse_arguments([command, "--log-level", "debug", "lb.toml"]).config == "lb.toml"


def test_the_config_argument_goes_anywhere_among_the_options() -> None:
    args = parse_arguments(["run", "--watch", "lb.toml", "--workers", "2"])
    assert (args.config, args.watch, args.workers) == ("lb.toml", True, 2)
    assert parse_arguments(["demo", "lb.toml", "--io", "portable"]).config == "lb.toml"
    assert parse_arguments(["top", "--token-file", "t", "lb.toml"]).config == "lb.toml"


@pytest.mark.slow
def test_a_config_argument_is_read_and_two_different_ones_are_refused(tmp_path: Path) -> None:
    checked = run_cli("check", "anubis.toml")
    assert checked.returncode == 0 and checked.stdout.startswith("anubis.toml: ok"), checked.stderr
    missing = tmp_path / "lb.toml"
    for command in ("run", "reload", "demo"):
        result = run_cli(command, str(missing))
        assert result.returncode == 1 and "unrecognized arguments" not in result.stderr
        assert f"{missing}: cannot read the config file" in result.stderr, result.stderr
    both = run_cli("check", "a.toml", "-c", "b.toml")
    assert both.returncode == 2
    assert both.stderr.splitlines()[-1] == ("anubis check: error: the config file is given twice: "
                                            "CONFIG 'a.toml' and -c 'b.toml'; give one")  # fmt: skip
    top = run_cli("top", "a.toml", "--admin", "http://127.0.0.1:1")
    assert top.returncode == 2 and "CONFIG 'a.toml' and --admin 'http://127.0.0.1:1'" in top.stderr


@pytest.mark.slow
def test_every_command_help_has_a_description_and_examples() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, parser in commands.items():
        text = parser.format_help()
        description = text.split("\n\n")[1]  # after the usage
        assert not description.startswith(("positional", "options")), f"anubis {name} has no description"
        assert len(description.split()) >= 20, f"anubis {name}: a one-paragraph description\n{text}"
        assert f"\nExamples:\n  anubis {name}" in text, f"anubis {name} --help shows no example\n{text}"
    shown = run_cli("run", "--help")
    assert shown.returncode == 0
    assert "Run the balancer from a config file" in shown.stdout
    assert "Examples:\n  anubis run lb.toml\n" in shown.stdout  # the lines kept as written
    assert "Examples:" in run_cli("--help").stdout


# Completes each line given after the script, as bash does on Tab: the line's words in COMP_WORDS,
# the completion function named by `complete -p anubis` called; prints one line of candidates each.
BASH_COMPLETE = r"""
source "$1"
spec=$(complete -p anubis) || exit 3
function=${spec##*-F }
function=${function%% *}
shift
for typed in "$@"; do
  read -ra COMP_WORDS <<< "$typed"
  [[ $typed == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMP_LINE=$typed
  COMP_POINT=${#typed}
  COMPREPLY=()
  "$function" anubis "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
  echo "${COMPREPLY[*]}"
done
"""


@pytest.mark.slow
def test_the_bash_completion_script_is_valid_and_completes_commands_options_and_files(tmp_path: Path) -> None:
    pytest.importorskip("shtab")
    generated = run_cli("completion", "bash")
    assert generated.returncode == 0, generated.stderr
    script = tmp_path / "anubis.bash"
    script.write_text(generated.stdout)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert syntax.returncode == 0, syntax.stderr
    typed = ["anubis ", "anubis ch", "anubis run --wa", "anubis top --token", "anubis completion ",
             "anubis run anubis.t"]  # fmt: skip
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", BASH_COMPLETE, "complete", str(script),
                             *typed], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    completed = dict(zip(typed, result.stdout.splitlines(), strict=True))
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert completed["anubis "].split() == list(commands)
    assert completed["anubis ch"] == "check"
    assert completed["anubis run --wa"] == "--watch"
    assert completed["anubis top --token"].split() == ["--token-file", "--token"]
    assert completed["anubis completion "].split() == ["bash", "zsh", "tcsh"]
    assert completed["anubis run anubis.t"] == "anubis.toml"  # a config file: the files here
    for shell in ("zsh", "tcsh"):
        other = run_cli("completion", shell)
        assert other.returncode == 0 and "anubis" in other.stdout and "completion" in other.stdout


@pytest.mark.slow
def test_completion_without_shtab_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['shtab'] = None; from trioanubis.cli import main; "
         "sys.exit(main(['completion', 'bash']))"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == "anubis: anubis completion needs the 'shtab' package: " \
                            "pip install 'trioanubis[completion]'\n"


@pytest.mark.slow
async def test_the_start_up_summary_is_logged_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, name_handler("x"))
    port = free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
                      f'[pools.web]\nservers = [{{ address = "{backend.address}", name = "one" }}]\n'
                      f'health = {{ check = "tcp", interval = "1h", rise = 1 }}\n')  # fmt: skip
    stderr = bytearray()
    async with anubis("run", "-c", str(config)) as process:
        await _read_until(process, b"ready", stderr)
        assert await http_get(port) == b"x"
    text = stderr.decode()
    assert text.count(f"listener web: 127.0.0.1:{port} -> pool web") == 1, text
    assert text.count("server one: ") == 1, text
    assert text.count("settings: drain_timeout") == 1, text
    assert " INFO    ready\npool web: 1/1 servers up\n" in text, text


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(CONFIG_COMMANDS), st.lists(st.sampled_from(["-c", "--config", "a.toml", "b.toml",
       "--admin", "--watch", "--", "-", "x"]) | st.text(max_size=6), max_size=5))  # fmt: skip
def test_fuzz_config_arguments_settle_on_one_file_or_stop_with_a_usage_error(
    command: str, words: list[str]
) -> None:
    try:
        args = parse_arguments([command, *words])
    except SystemExit as exc:
        # argparse's usage error, on stderr; or the help or version a word the text strategy made
        # asked for (-h, or --help and --version as argparse takes them: any prefix of three or more)
        exits = ("--help", "--version")
        asked = any(w.startswith("-h") or (len(w) > 2 and any(e.startswith(w) for e in exits)) for w in words)
        assert exc.code == 2 or (exc.code == 0 and asked)
    else:
        assert (args.config is None and command == "top") or isinstance(args.config, str)
        assert args.config in (None, "anubis.toml", *words)
