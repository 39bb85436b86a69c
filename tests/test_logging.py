"""Logging: it never blocks the balancer, drops and counts what it cannot write, and speaks JSON.

The balancer runs as a real `anubis run` process where it matters: a stderr pipe
nobody reads must not stop it serving or stopping.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest.mock import patch

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    connect,
    echo_handler,
    free_port,
    name_handler,
    request,
    start_backend,
)
from tests.helpers import ANUBIS, ROOT, http_get, wait_port
from trioanubis.config import Address
from trioanubis.ops.accesslog import AccessLine, JsonFormatter, TextFormatter
from trioanubis.ops.logwriter import LogWriter
from trioanubis.proxy.record import END_STATES, ConnectionRecord

# One request per connection; enough connections that their access-log lines overflow a
# 64 KiB pipe and the writer's queue many times over, checked every batch.
BATCH = 500
MOST_REQUESTS = 40_000


@asynccontextmanager
async def balancer_process(config: Path) -> AsyncIterator[trio.Process]:
    """`anubis run -c config` with stderr a pipe this test never reads; killed if it outlives the test."""
    process = await trio.lowlevel.open_process(
        [*ANUBIS, "run", "-c", str(config)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


def config_text(port: int, servers: str, head: str = "", health: str = '{ check = "none" }') -> str:
    """A one-listener config on 127.0.0.1:`port`; `servers` is the TOML array, `head` goes first."""
    return (f'{head}[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
            f"[pools.web]\nservers = {servers}\nhealth = {health}\n")  # fmt: skip


def metric(text: bytes, name: str) -> int:
    found = re.search(rb"^" + name.encode() + rb" (\d+)$", text, re.MULTILINE)
    assert found is not None, text
    return int(found.group(1))


@pytest.mark.slow
async def test_a_stderr_pipe_nobody_reads_never_stops_serving_or_stopping(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, name_handler("served"))
    port, admin = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(config_text(port, f'["{backend.address}"]', f'[admin]\nbind = "127.0.0.1:{admin}"\n'))
    address = Address("127.0.0.1", port)
    async with balancer_process(config) as process:
        await wait_port(port)
        served = 0

        async def serve_batch() -> None:
            nonlocal served
            async with trio.open_nursery() as clients:
                for _ in range(16):
                    clients.start_soon(some_requests, BATCH // 16)

        async def some_requests(count: int) -> None:
            nonlocal served
            for _ in range(count):
                with trio.fail_after(EVENTUALLY):  # frozen on a blocking write, it would never answer
                    assert await request(address, b"x") == b"served"
                served += 1

        dropped = 0
        with trio.fail_after(600):
            while not dropped and served < MOST_REQUESTS:
                await serve_batch()
                dropped = metric(await http_get(admin, "/metrics"), "anubis_log_dropped_total")
            assert dropped, f"{served} connections and no log line dropped"
            await serve_batch()  # still serving, the sink still stalled
            assert metric(await http_get(admin, "/metrics"), "anubis_log_dropped_total") > dropped
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):  # exit flushes for a bounded time, never hangs on the pipe
            await process.wait()
        assert process.returncode == 0


def fill(pipe: int) -> None:
    """Fill a pipe to the brim, so the next blocking write waits for a reader."""
    os.set_blocking(pipe, False)
    try:
        while True:
            os.write(pipe, b"\n" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(pipe, True)


def stop(writer: LogWriter, read_end: int, write_end: int) -> None:
    """End the writer's thread before its descriptor closes (its number could be reused)."""
    writer.close()
    os.close(read_end)  # a write still blocked fails (EPIPE), and so do the rest
    assert writer.drain(EVENTUALLY)
    os.close(write_end)


def read_everything_written(read_end: int, writer: LogWriter) -> bytes:
    """Read the pipe until the writer has written all it queued (and said what it dropped)."""
    received = b""
    deadline = time.monotonic() + EVENTUALLY
    while True:
        while select.select([read_end], [], [], 0)[0]:  # make room: the writer goes on
            received += os.read(read_end, 1 << 16)
        if writer.drain(0.01):
            while select.select([read_end], [], [], 0)[0]:
                received += os.read(read_end, 1 << 16)
            return received
        assert time.monotonic() < deadline, "the writer stopped writing"


@pytest.mark.slow
def test_dropped_lines_are_counted_and_reported_once_the_sink_recovers() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end, limit=4096)
    try:
        fill(write_end)  # a stalled sink: the writer thread blocks on its first line
        writer.setFormatter(JsonFormatter())
        total = 1000
        for i in range(total):  # the queue fills, then lines are dropped and counted
            writer.handle(logging.LogRecord("trioanubis.test", logging.INFO, __file__, 0, "line %d %s",
                                            (i, "x" * 60), None))  # fmt: skip
        assert writer.dropped > 0
        received = read_everything_written(read_end, writer)  # the sink recovers
        lines = [json.loads(line) for line in received.splitlines() if line]  # whole lines, JSON
        [report] = [line for line in lines if line["logger"] == "trioanubis.log"]
        assert report["level"] == "warning"
        assert report["message"] == f"dropped {writer.dropped} log lines: the log output could not keep up"
        assert lines[-1] == report  # once, after what was queued
        written = [line for line in lines if line["logger"] == "trioanubis.test"]
        numbers = [int(str(line["message"]).split()[1]) for line in written]
        assert numbers == list(range(len(written)))  # the first ones, in order
        assert len(written) + writer.dropped == total  # nothing lost that is not counted
    finally:
        stop(writer, read_end, write_end)


@pytest.mark.slow
def test_flush_gives_up_on_a_stalled_sink() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end, limit=4096)
    try:
        fill(write_end)
        while not writer.dropped:
            writer.put(b"x" * 99 + b"\n")
        assert not writer.drain(0.05)  # bounded: returns although nothing drains
    finally:
        stop(writer, read_end, write_end)


@pytest.mark.slow
@given(st.lists(st.text(), max_size=20))
@settings(max_examples=100, deadline=None)
def test_any_message_is_one_whole_json_line(messages: list[str]) -> None:
    """Whatever a log line carries (names from configs and DNS, newlines, lone surrogates)."""
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end)
    try:
        writer.setFormatter(JsonFormatter())
        for message in messages:
            writer.handle(logging.LogRecord("trioanubis.test", logging.INFO, __file__, 0, "%s",
                                            (message,), None))  # fmt: skip
        lines = read_everything_written(read_end, writer).splitlines()
        assert [json.loads(line)["message"] for line in lines] == messages
        assert writer.dropped == 0
    finally:
        stop(writer, read_end, write_end)


@pytest.mark.slow
async def test_json_log_format_makes_every_stderr_line_json(nursery: trio.Nursery, tmp_path: Path) -> None:
    up = await start_backend(nursery, echo_handler)
    port, dead = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(
        f'[settings]\nlog_format = "json"\ndrain_timeout = "100ms"\n'
        f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
        f'[pools.web]\nservers = [{{ address = "{up.address}", name = "up" }}, '
        f'{{ address = "127.0.0.1:{dead}", name = "dead" }}]\n'
        f'health = {{ check = "tcp", interval = "1h", rise = 1, fall = 1 }}\n'
    )
    async with balancer_process(config) as process:
        assert process.stderr is not None
        lines: list[dict[str, object]] = []
        buffer = b""

        async def read_until(predicate: str) -> None:
            nonlocal buffer
            assert process.stderr is not None
            with trio.fail_after(EVENTUALLY):
                while not any(predicate in str(line.get("message", "")) for line in lines):
                    data = await process.stderr.receive_some()
                    assert data, f"stderr ended before {predicate!r}: {lines}"
                    *complete, buffer = (buffer + data).split(b"\n")
                    lines.extend(json.loads(line) for line in complete if line)

        await read_until("ready")
        process.send_signal(signal.SIGHUP)
        await read_until("reload applied")
        held = await connect(Address("127.0.0.1", port))
        await held.send_all(b"held")
        assert await held.receive_some(4) == b"held"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()
        assert process.returncode == 0
        while data := await process.stderr.receive_some():
            buffer += data
        lines += [json.loads(line) for line in buffer.split(b"\n") if line]  # every line is JSON
        await held.aclose()

    def level_of(text: str) -> str:
        [line] = [line for line in lines if text in str(line.get("message", ""))]
        return str(line["level"])

    assert level_of("server up is up") == "info"  # a normal state change
    assert level_of("server dead is down") == "warning"
    assert level_of("reload applied") == "info"
    assert level_of("draining 1 open connection for") == "info"
    assert level_of("drain timeout: resetting 1 open connection") == "warning"


@pytest.mark.slow
async def test_a_fatal_bind_error_is_json_under_the_json_format(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "anubis.toml"
        config.write_text(config_text(port, '["127.0.0.1:1"]', '[settings]\nlog_format = "json"\n'))
        result = await trio.run_process([*ANUBIS, "run", "-c", str(config)], cwd=ROOT, capture_stdout=True,
                                        capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.decode().splitlines()]  # every line is JSON
    [fatal] = [line for line in lines if line["level"] == "error"]
    assert str(fatal["message"]).startswith(f"binding 127.0.0.1:{port}: ")
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.slow
async def test_a_fatal_error_stays_one_plain_line_under_the_text_format(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "anubis.toml"
        config.write_text(config_text(port, '["127.0.0.1:1"]'))
        result = await trio.run_process([*ANUBIS, "run", "-c", str(config)], cwd=ROOT, capture_stdout=True,
                                        capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1].startswith(f"anubis: binding 127.0.0.1:{port}: ")


# ------------------------------------------------------ access lines, deferred


# The formats as they were before access lines skipped `logging`: the reference.
OLD_TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s {tag}%(message)s"
OLD_ACCESS_MESSAGE = "%s %s -> %s in=%d out=%d %.1fms %s"


def old_text_formatter(worker: int | None) -> logging.Formatter:
    tag = "" if worker is None else f"worker {worker}: "
    formatter = logging.Formatter(OLD_TEXT_FORMAT.format(tag=tag), "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


def logged_the_old_way(record: ConnectionRecord, created: float) -> logging.LogRecord:
    """The LogRecord `AccessLog.log` made through `logging.info` before lines were deferred."""
    end = record.end or "shutdown"
    duration = record.ended - record.started
    fields = {
        "listener": record.listener, "client": record.client, "server": record.server,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out, "duration": round(duration, 6),
        "end": end,
    }  # fmt: skip
    args = (record.listener, record.client, record.server, record.bytes_in, record.bytes_out,
            duration * 1000, end)  # fmt: skip
    access = logging.getLogger("trioanubis.access")
    with patch("time.time", return_value=created), patch("time.time_ns", return_value=round(created * 1e9)):
        return access.makeRecord(access.name, logging.INFO, __file__, 0, OLD_ACCESS_MESSAGE, args, None,
                                 extra={"access": fields})  # fmt: skip


hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
records = st.builds(
    ConnectionRecord,
    listener=st.text(),
    peer=st.tuples(hosts, st.integers(0, 65535)),
    server=st.text(),
    bytes_in=st.integers(0, 1 << 50),
    bytes_out=st.integers(0, 1 << 50),
    started=st.floats(0, 1e6),
    ended=st.floats(1e6, 2e6),
    end=st.sampled_from([*END_STATES, ""]),
)
# When a line is logged: whole milliseconds plus 100–899 µs, away from the rounding edges where
# Python 3.13's nanosecond msecs and 3.10–3.12's float msecs may differ by one.
times = st.builds(lambda s, ms, us: s + ms / 1e3 + us / 1e6, st.integers(0, 4_000_000_000),
                  st.integers(0, 999), st.integers(100, 899))  # fmt: skip


# RFC 3339 (and ISO 8601) in UTC, to the millisecond: what the JSON log's `time` is.
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def assert_rfc3339_of(text: str, created: float) -> None:
    """`text` is RFC 3339 UTC with milliseconds and names `created`, cut to the millisecond."""
    assert RFC3339_MS.fullmatch(text), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
    assert parsed.utcoffset() == timedelta(0)
    fraction = timedelta(microseconds=round(created % 1 * 1e6))
    exact = datetime.fromtimestamp(int(created), timezone.utc) + fraction
    assert parsed <= exact < parsed + timedelta(milliseconds=1), (text, created)


@pytest.mark.slow
@given(times)
@settings(max_examples=300, deadline=None)
def test_the_json_time_is_rfc3339_utc_to_the_millisecond(created: float) -> None:
    record = logging.LogRecord("trioanubis.test", logging.INFO, __file__, 0, "m", None, None)
    record.created = created
    assert_rfc3339_of(json.loads(JsonFormatter().format(record))["time"], created)


@pytest.mark.slow
def test_the_json_time_of_a_known_moment() -> None:
    record = logging.LogRecord("trioanubis.test", logging.INFO, __file__, 0, "m", None, None)
    record.created = 1_700_000_000.25
    assert json.loads(JsonFormatter().format(record))["time"] == "2023-11-14T22:13:20.250Z"


@pytest.mark.slow
@given(records, times, st.one_of(st.none(), st.integers(0, 64)))
@settings(max_examples=300, deadline=None)
def test_a_deferred_access_line_is_the_line_logging_wrote_before(
    record: ConnectionRecord, created: float, worker: int | None
) -> None:
    """Formatted without a LogRecord (on the loop, or on the writer thread when deferred): byte for
    byte the old line, text and JSON."""
    old = logged_the_old_way(record, created)
    text = old_text_formatter(worker).format(old)
    assert AccessLine(record, created, TextFormatter(worker)).render() == text
    assert TextFormatter(worker).format(old) == text  # lines that go through logging too
    json_line = AccessLine(record, created, JsonFormatter(worker)).render()
    assert json_line == JsonFormatter(worker).format(old)
    keys = ["time", "level", "logger", *(["worker"] if worker is not None else []),
            "listener", "client", "server", "bytes_in", "bytes_out", "duration", "end"]  # fmt: skip
    assert list(json.loads(json_line)) == keys
    assert json.loads(json_line).get("worker") == worker
    assert_rfc3339_of(json.loads(json_line)["time"], created)
    plain = logging.Formatter("%(name)s %(levelname)s %(message)s")  # another formatter: via a LogRecord
    assert AccessLine(record, created, plain).render() == plain.format(old)


def test_deferred_lines_are_bounded_counted_when_dropped_and_reported() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end, limit=4096)
    try:
        fill(write_end)  # a stalled sink
        writer.setFormatter(JsonFormatter())
        total = 1000
        for i in range(total):
            record = ConnectionRecord("web", ("192.0.2.1", i), "s1", i, 0, 0.0, 0.5, "client_eof")
            writer.defer(AccessLine(record, 1_700_000_000.25, writer.formatter))
        assert 0 < writer.dropped < total  # bounded: the queue took some, then dropped the rest
        received = read_everything_written(read_end, writer)
        lines = [json.loads(line) for line in received.splitlines() if line]
        access = [line for line in lines if line["logger"] == "trioanubis.access"]
        assert [line["bytes_in"] for line in access] == list(range(len(access)))  # the first ones, in order
        assert len(access) + writer.dropped == total
        [report] = [line for line in lines if line["logger"] == "trioanubis.log"]
        assert report["message"] == f"dropped {writer.dropped} log lines: the log output could not keep up"
    finally:
        stop(writer, read_end, write_end)


class Broken:
    def render(self) -> str:
        raise ValueError("a formatter bug")


@pytest.mark.slow
def test_a_deferred_line_that_fails_to_render_is_counted_and_the_writer_goes_on() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end)
    try:
        writer.put(b"before\n")
        writer.defer(Broken())
        record = ConnectionRecord("web", ("192.0.2.1", 1), "s1", 3, 4, 0.0, 0.5, "server_eof")
        writer.defer(AccessLine(record, 1_700_000_000.25, TextFormatter()))
        lines = read_everything_written(read_end, writer).splitlines()
        line = b"2023-11-14T22:13:20.250 INFO    web 192.0.2.1:1 -> s1 in=3 out=4 500.0ms server_eof"
        assert lines == [b"before", line]
        assert writer.lost == 1
    finally:
        stop(writer, read_end, write_end)


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_access_lines_of_a_real_process_keep_their_format(
    nursery: trio.Nursery, tmp_path: Path, log_format: str
) -> None:
    backend = await start_backend(nursery, echo_handler)
    port = free_port()
    config = tmp_path / "anubis.toml"
    head = f'[settings]\nlog_format = "{log_format}"\naccess_log = true\n'
    config.write_text(config_text(port, f'[{{ address = "{backend.address}", name = "echo" }}]', head))
    async with balancer_process(config) as process:
        await wait_port(port)  # a connection too: it logs `in=0`, left out below
        for payload in (b"one", b"three"):
            assert await request(Address("127.0.0.1", port), payload) == payload
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(EVENTUALLY):
            await process.wait()
        assert process.stderr is not None
        output = b""
        while data := await process.stderr.receive_some():
            output += data
    if log_format == "json":
        lines = [json.loads(line) for line in output.splitlines()]
        access = [line for line in lines if line["logger"] == "trioanubis.access" and line["bytes_in"]]
        fields = [(line["listener"], line["server"], line["bytes_in"], line["bytes_out"], line["end"],
                   line["level"]) for line in access]  # fmt: skip
        assert fields == [("web", "echo", n, n, "client_eof", "info") for n in (3, 5)]
        assert all(str(line["client"]).startswith("127.0.0.1:") for line in access)
        assert all(isinstance(line["duration"], float) for line in access)
        assert all(RFC3339_MS.fullmatch(line["time"]) for line in lines)  # access lines and the others
    else:
        pattern = (rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} INFO    web 127\.0\.0\.1:\d+ -> echo "
                   rb"in=(\d+) out=(\d+) \d+\.\dms client_eof$")  # fmt: skip
        found = [m.groups() for m in re.finditer(pattern, output, re.MULTILINE) if m[1] != b"0"]
        assert found == [(b"3", b"3"), (b"5", b"5")], output
