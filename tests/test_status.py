"""`anubis proxy`'s status (status.py): the line's format, the terminal handler, plain lines elsewhere."""

from __future__ import annotations

import io
import logging
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import EVENTUALLY, free_port, name_handler, start_backend, wait_until
from tests.peers import need
from trioanubis.ops.status import CLEAR_LINE, Sample, StatusHandler, format_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_line_says_servers_held_clients_and_rate() -> None:
    assert format_status(Sample(2, 3, 1, 12.345)) == "servers 2/3 up · 1 held · 12.3 conn/s"
    assert format_status(Sample(0, 0, 0, 0.0, rolling=True)) == (
        "servers 0/0 up · 0 held · 0.0 conn/s · rolling restart"
    )
    cut = format_status(Sample(2, 3, 1, 12.345), width=20)
    assert len(cut) == 19 and cut.endswith("…")


def test_log_lines_go_above_the_status_line() -> None:
    stream = io.StringIO()
    handler = StatusHandler(stream, logging.Formatter("%(message)s"))
    handler.show("servers 1/1 up")
    handler.emit(logging.LogRecord("trioanubis", logging.INFO, "", 0, "a log line", None, None))
    handler.close()
    assert stream.getvalue() == (
        f"{CLEAR_LINE}servers 1/1 up{CLEAR_LINE}a log line\nservers 1/1 up{CLEAR_LINE}"
    )


@pytest.mark.slow
async def test_without_a_terminal_the_status_is_plain_log_lines(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("one"))
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioanubis", "proxy", f"127.0.0.1:{port}", backend.address],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    output = bytearray()
    assert process.stderr is not None
    try:
        with trio.fail_after(EVENTUALLY):
            while "status: servers 1/1 up · 0 held" not in output.decode(errors="replace"):
                output += await process.stderr.receive_some()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            while data := await process.stderr.receive_some():
                output += data
            await process.wait()
    assert process.returncode == 0
    assert b"\r" not in output and b"\x1b" not in output


@pytest.mark.slow
async def test_on_a_terminal_the_status_is_one_live_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    tmux = need("tmux")
    backend = await start_backend(nursery, name_handler("one"))
    port = free_port()
    session = f"anubis-status-{port}"
    command = shlex.join([sys.executable, "-m", "trioanubis", "proxy", f"127.0.0.1:{port}", backend.address])
    socket_path = str(tmp_path / "tmux.sock")
    tmux_cmd = [tmux, "-S", socket_path]
    subprocess.run([*tmux_cmd, "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                    f"cd {shlex.quote(str(ROOT))} && {command}; sleep 60"], check=True)  # fmt: skip

    def screen() -> str:
        return subprocess.run([*tmux_cmd, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout  # fmt: skip

    try:
        await wait_until(lambda: "servers 1/1 up · 0 held" in screen())
        lines = [line for line in screen().splitlines() if "servers 1/1 up" in line]
        assert len(lines) == 1 and lines[0].startswith("servers 1/1 up · 0 held · ")  # redrawn, not repeated
        subprocess.run([*tmux_cmd, "send-keys", "-t", session, "C-c"], check=True)
        await wait_until(lambda: "INFO    stopped" in screen())
        assert "servers 1/1 up" not in screen()  # the line is cleared on the way out
    finally:
        subprocess.run([*tmux_cmd, "kill-server"], capture_output=True)
