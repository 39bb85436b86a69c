"""`workers = N`: a supervisor and its worker processes — real processes, real sockets, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    connect,
    echo_handler,
    ending,
    free_port,
    name_handler,
    request,
    start_backend,
    wait_until,
)
from tests.helpers import (
    ANUBIS,
    ROOT,
    admin,
    all_serving,
    anubis,
    process_stderr,
    run_cli,
    stats,
    supervisor,
    write_config,
)
from trioanubis.config import Address
from trioanubis.errors import ChannelError
from trioanubis.workers.channel import LineDecoder, encode
from trioanubis.workers.merge import sum_metrics

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need a Unix")


def gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaped yet counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return "\nState:\tZ" in status


@pytest.mark.slow
async def test_connections_spread_over_workers_and_admin_sums_are_the_sums(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address], access_log=False)
    async with supervisor(config):
        await all_serving(admin_port, 2)
        for _ in range(200):  # each from its own source port: SO_REUSEPORT hashes them apart
            assert await request(Address("127.0.0.1", port)) == b"a"
        doc = await stats(admin_port)
        per_worker = [w["accepted"] for w in doc["workers"]]
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) == doc["listeners"][0]["accepted"] == 200
        assert doc["pools"][0]["servers"][0]["total"] == 200
        assert doc["endings"] == {"client_eof": 200}
        status, metrics = await admin(admin_port, "/metrics")
        assert status == 200
        assert b'anubis_listener_connections_total{listener="web"} 200\n' in metrics
        assert b'anubis_worker_up{worker="2"} 1\n' in metrics
        assert (await admin(admin_port, "/readyz"))[0] == 200


@pytest.mark.slow
async def test_kill_9_one_worker_ends_only_its_connections_and_it_comes_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address])
    async with supervisor(config):
        await all_serving(admin_port, 2)
        held = [await connect(Address("127.0.0.1", port)) for _ in range(24)]
        for stream in held:  # mid-transfer: every one has carried bytes both ways
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        doc = await stats(admin_port)
        victim, survivor = doc["workers"]
        assert victim["active"] + survivor["active"] == 24
        os.kill(victim["pid"], signal.SIGKILL)
        # Its listening socket closes with it (the kernel may finish that a moment after the exit,
        # hence: once the supervisor saw the exit). Connections still queued on it are reset:
        # SO_REUSEPORT's trade-off, unless net.ipv4.tcp_migrate_req = 1.
        with trio.fail_after(EVENTUALLY):
            while (await stats(admin_port))["workers"][0]["pid"] == victim["pid"]:
                await trio.sleep(0.01)
        assert await request(Address("127.0.0.1", port), b"at once") == b"at once"
        ended = alive = 0
        for stream in held:
            try:
                await stream.send_all(b"y")
                with trio.fail_after(EVENTUALLY):
                    answer = await stream.receive_some(1)
            except trio.BrokenResourceError:
                answer = b""
            if answer == b"y":
                alive += 1
            else:
                ended += 1
            await stream.aclose()
        assert (ended, alive) == (victim["active"], survivor["active"])
        back = await all_serving(admin_port, 2)
        assert back["workers"][0]["pid"] != victim["pid"]
        assert back["workers"][0]["restarts"] == 1
        assert back["workers"][1]["pid"] == survivor["pid"]


@pytest.mark.slow
async def test_sigterm_drains_every_worker_and_exits_zero(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address])
    async with supervisor(config) as process:
        doc = await all_serving(admin_port, 2)
        pids = [w["pid"] for w in doc["workers"]]
        held = [await connect(Address("127.0.0.1", port)) for _ in range(16)]
        for stream in held:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: backend.active == 16)
        for stream in held:  # every worker drains: open connections keep flowing
            await stream.send_all(b"still")
            got = b""
            while len(got) < 5:
                got += await stream.receive_some(5)
            assert got == b"still"
            await stream.send_eof()
            assert await ending(stream) == "eof"
            await stream.aclose()
        with trio.fail_after(EVENTUALLY):
            await process.wait()
        assert process.returncode == 0
        assert all(gone(pid) for pid in pids)


@pytest.mark.slow
async def test_sighup_adds_a_server_in_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    old = await start_backend(nursery, name_handler("old"))
    new = await start_backend(nursery, name_handler("new"))
    port, admin_port = free_port(), free_port()
    config, pid_file = tmp_path / "anubis.toml", tmp_path / "anubis.pid"
    write_config(config, port, admin_port, [old.address], access_log=False, pid_file=str(pid_file))
    async with supervisor(config) as process:
        await all_serving(admin_port, 2)
        # The supervisor's, once it serves: waited for, as test_operations does (no race with its write).
        await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() == str(process.pid))
        write_config(config, port, admin_port, [old.address, new.address], access_log=False,
                     pid_file=str(pid_file))  # fmt: skip
        result = await trio.to_thread.run_sync(run_cli, "reload", "-c", str(config))  # SIGHUP, by pid file
        assert result.returncode == 0, result.stderr
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(EVENTUALLY):
            while b"reload applied in" not in seen:
                seen += await process.stderr.receive_some()
        assert b"reload applied in 2 of 2 workers" in seen
        doc = await stats(admin_port)
        assert [s["name"] for s in doc["pools"][0]["servers"]] == [old.address, new.address]
        answers = [await request(Address("127.0.0.1", port)) for _ in range(60)]
        assert set(answers) == {b"old", b"new"}
        assert all(w["accepted"] > 0 for w in (await stats(admin_port))["workers"])


@pytest.mark.slow
async def test_invalid_reload_is_rejected_once_and_every_worker_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address])
    async with supervisor(config) as process:
        await all_serving(admin_port, 2)
        config.write_text(config.read_text().replace('check = "none"', 'check = "sometimes"'))
        process.send_signal(signal.SIGHUP)
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(EVENTUALLY):
            while b"reload rejected" not in seen:
                seen += await process.stderr.receive_some()
        assert seen.count(b"reload rejected") == 1
        assert b"pools.web.health.check: must be one of" in seen
        for _ in range(10):
            assert await request(Address("127.0.0.1", port)) == b"a"


@pytest.mark.slow
async def test_drain_through_the_admin_applies_in_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [one.address, two.address], access_log=False)
    async with supervisor(config):
        await all_serving(admin_port, 2)
        status, body = await admin(admin_port, f"/pools/web/servers/{one.address}/drain", "POST")
        assert status == 200, body
        assert json.loads(body)["state"] == "draining"
        answers = {await request(Address("127.0.0.1", port)) for _ in range(40)}
        assert answers == {b"two"}  # confirmed only once every worker applied it
        status, _ = await admin(
            admin_port, f"/pools/web/servers/{one.address}/weight", "POST", b'{"weight": x}'
        )
        assert status == 400


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 4])
async def test_a_backend_sees_one_probe_stream(nursery: trio.Nursery, tmp_path: Path, workers: int) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    health = 'check = "tcp"\ninterval = "100ms"'
    write_config(config, port, admin_port, [backend.address], workers=workers, health=health)
    async with supervisor(config, "--workers", str(workers)):
        await wait_until(lambda: backend.connections >= 20)

        async def checks() -> int:
            _, metrics = await admin(admin_port, "/metrics")
            line = next(x for x in metrics.decode().splitlines()
                        if x.startswith("anubis_health_checks_total") and 'result="pass"' in x)  # fmt: skip
            return int(line.rsplit(" ", 1)[1])

        # Every connection the backend saw is a probe counted by the one health view (give or take
        # the probe in flight): workers probe nothing of their own.
        before, seen, after = await checks(), backend.connections, await checks()
        assert before - 1 <= seen <= after + 1, (before, seen, after)


@pytest.mark.slow
async def test_sigkill_to_the_supervisor_leaves_no_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address])
    process = await trio.lowlevel.open_process([*ANUBIS, "run", "-c", str(config)])
    try:
        pids = [w["pid"] for w in (await all_serving(admin_port, 2))["workers"]]
        held = await connect(Address("127.0.0.1", port))
        await held.send_all(b"x")
        assert await held.receive_some(1) == b"x"
        process.kill()
        await process.wait()
        await held.send_all(b"y")  # its worker drains it, as on SIGTERM, then goes
        assert await held.receive_some(1) == b"y"
        await held.aclose()
        with trio.fail_after(EVENTUALLY):
            while not all(gone(pid) for pid in pids):
                await trio.sleep(0.05)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
def test_workers_setting_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "anubis.toml"
    for value, ok in (('"auto"', True), ("4", True), ("0", False), ('"many"', False), ("true", False)):
        write_config(config, 1, 2, ["127.0.0.1:3"], workers=1)
        config.write_text(config.read_text().replace("workers = 1", f"workers = {value}"))
        result = run_cli("check", "-c", str(config))
        assert (result.returncode == 0) == ok, (value, result.stderr)
        if not ok:
            assert "settings.workers: must be" in result.stderr


# ------------------------------------------------------------ control channel

messages = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
).map(lambda d: {**d, "t": "x"})


@pytest.mark.slow
@given(st.lists(messages, max_size=5), st.data())
@settings(max_examples=200, deadline=None)
def test_channel_lines_round_trip_in_any_chunking(sent: list[dict[str, Any]], data: st.DataObject) -> None:
    wire = b"".join(encode(m) for m in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder, got = LineDecoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += decoder.feed(wire[start:end])
    assert got == sent


@pytest.mark.slow
@given(st.lists(st.binary(max_size=64), max_size=8))
@settings(max_examples=300, deadline=None)
def test_channel_decoder_raises_only_channel_errors_and_recovers(chunks: list[bytes]) -> None:
    decoder = LineDecoder(max_line=100)
    for chunk in chunks:
        with contextlib.suppress(ChannelError):
            decoder.feed(chunk)
    with contextlib.suppress(ChannelError):
        decoder.feed(b"\n")  # whatever came before, a fresh line decodes
    assert decoder.feed(encode({"t": "ok"})) == [{"t": "ok"}]


@pytest.mark.slow
def test_channel_decoder_refuses_deep_nesting_and_long_lines() -> None:
    decoder = LineDecoder(max_line=1000)
    with pytest.raises(ChannelError, match="nests"):
        decoder.feed(b"[" * 500 + b"]" * 500 + b"\n")
    with pytest.raises(ChannelError, match="longer than"):
        decoder.feed(b"x" * 2000)
    assert decoder.feed(b"still the long line\n" + encode({"t": "next"})) == [{"t": "next"}]


@pytest.mark.slow
def test_metrics_sum_counters_and_keep_shared_gauges_from_the_view() -> None:
    view = '# TYPE anubis_server_up gauge\nanubis_server_up{s="a"} 1\n# TYPE anubis_c counter\nanubis_c 0\n'
    worker = '# TYPE anubis_server_up gauge\nanubis_server_up{s="a"} 0\n# TYPE anubis_c counter\nanubis_c 3\n'
    assert sum_metrics([view, worker, worker]) == (
        '# TYPE anubis_server_up gauge\nanubis_server_up{s="a"} 1\n# TYPE anubis_c counter\nanubis_c 6\n'
    )


# ------------------------------------------------- a worker's control input

WORKER_TOML = """
[listeners.web]
bind = "127.0.0.1:0"
pool = "web"
[pools.web]
servers = ["{server}"]
[pools.web.health]
check = "none"
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
commands = st.fixed_dictionaries(  # a rogue supervisor's commands: nothing that would take the server out
    {"op": st.sampled_from(["drain", "enable", "weight", "faults", "clear_faults", "add", "remove", "x"])},
    optional={"pool": st.sampled_from(["web", "nope"]) | json_values, "server": st.just("nope") | json_values,
              "weight": json_values, "faults": json_values | st.just({"latency": "1h"})},
) | json_values  # fmt: skip
control_messages = st.fixed_dictionaries(
    {"t": st.sampled_from(["state", "config", "ask", "answer", "command", "nonsense", ""])},
    optional={
        "command": commands,
        "seq": json_values | st.sampled_from([10**30, 1e309, -1]),
        "pools": json_values | st.just({"web": [["x", "y", True, False, 1, 1.0]]}),
        "id": json_values,
        "what": st.sampled_from(["stats", "metrics", "ready", "x"]) | json_values,
        "text": st.text(max_size=60) | st.just("[listeners]"),
        "source": json_values,
        "binds": json_values | st.just({"web": "127.0.0.1:0"}),
    },
)
raw_lines = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"") + b"\n")


async def _fuzz_one_worker(server: str, inputs: list[bytes]) -> None:
    from trioanubis.workers.channel import Channel
    from trioanubis.workers.worker import run_worker

    ours, theirs = trio.socket.socketpair()
    supervisor_end = Channel(trio.SocketStream(ours))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_worker(Channel(trio.SocketStream(theirs)), 7, own_logging=False))
        text = WORKER_TOML.format(server=server)
        await supervisor_end.send({"t": "config", "text": text, "source": "fuzz.toml",
                                   "binds": {"web": "127.0.0.1:0"}})  # fmt: skip
        await supervisor_end.send(
            {"t": "state", "seq": 1, "pools": {"web": [[server, server, True, False, 1, 1.0]]}}
        )
        with trio.fail_after(EVENTUALLY):
            while (message := await supervisor_end.receive()) and message["t"] != "ready":
                pass
        for data in inputs:
            await supervisor_end.stream.send_all(data)
        await supervisor_end.send({"t": "ask", "id": "last", "what": "stats"})
        with trio.fail_after(EVENTUALLY):
            while True:
                message = await supervisor_end.receive()
                assert message is not None
                if message["t"] == "answer" and message["id"] == "last":
                    break
        bind = message["value"]["listeners"][0]["bind"]
        host, _, port = bind.rpartition(":")
        assert await request(Address(host, int(port))) == b"fuzz"  # still serving
        await supervisor_end.aclose()  # the supervisor "dies": the worker drains and returns


@pytest.mark.slow
@given(st.lists(control_messages.map(encode) | raw_lines, max_size=8))
@example([encode({"t": "state", "seq": 1e309, "pools": {}})])  # int(inf): OverflowError stopped a worker
@example([encode({"t": "command", "seq": 2,
                  "command": {"op": "weight", "pool": "web", "server": "x", "weight": 1e309}}),
          encode({"t": "command", "seq": "2", "command": {"op": "drain"}})])  # fmt: skip
@settings(max_examples=40, deadline=None)
def test_fuzzed_control_messages_never_stop_a_worker(inputs: list[bytes]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery, name_handler("fuzz"))
            await _fuzz_one_worker(backend.address, inputs)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.slow
async def test_an_ejection_seen_by_one_worker_reaches_every_worker(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    live = await start_backend(nursery, name_handler("live"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every connect fails
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [dead, live.address], log_format="json",
                 pool='eject_after = 1\neject_for = "10m"')  # fmt: skip
    async with supervisor(config) as process:
        await all_serving(admin_port, 2)
        assert await request(Address("127.0.0.1", port)) == b"live"  # failed over, and ejected
        with trio.fail_after(EVENTUALLY):
            while (await stats(admin_port))["pools"][0]["servers"][0]["state"] != "down":
                await trio.sleep(0.02)
        failures = (await stats(admin_port))["pools"][0]["servers"][0]["connect_failures"]
        # The ejection is in every worker now: no worker tries the dead server again.
        assert {await request(Address("127.0.0.1", port)) for _ in range(40)} == {b"live"}
        doc = await stats(admin_port)
        assert doc["pools"][0]["servers"][0]["connect_failures"] == failures
        assert all(w["accepted"] > 0 for w in doc["workers"])
        # Ours are 41; another test's client that came to this port (free_port hands out ports the
        # kernel may hand out again) would be one more, and has its line too.
        accepted = sum(w["accepted"] for w in doc["workers"])
        assert accepted >= 41
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        with trio.fail_after(EVENTUALLY):
            await process.wait()
        err = b""
        while data := await process.stderr.receive_some():
            err += data
        lines = [json.loads(x) for x in err.splitlines() if x]
    access = [x for x in lines if x.get("logger") == "trioanubis.access"]
    assert len(access) == accepted  # one line per connection, whichever worker served it
    assert {x["worker"] for x in access} == {1, 2}
    assert any("ejected by worker" in x.get("message", "") for x in lines)


def test_a_snapshot_brings_state_and_slow_start_weight_and_respects_a_local_ejection() -> None:
    from trioanubis.config import parse_config
    from trioanubis.pool import Pool
    from trioanubis.workers.merge import apply_snapshot, snapshot

    config = parse_config({"listeners": {"l": {"bind": ":0", "pool": "p"}},
                           "pools": {"p": {"servers": ["127.0.0.1:1", "127.0.0.1:2"]}}})  # fmt: skip
    view, worker = Pool(config.pools["p"]), Pool(config.pools["p"])
    view.mark_up(view.servers[0])
    view.set_weight(view.servers[0], 4)
    view.set_effective_weight(view.servers[0], 1.0)  # slow start, a quarter of the way
    view.mark_up(view.servers[1])
    version = worker.version
    apply_snapshot({"p": worker}, snapshot({"p": view}, 1), held=[("127.0.0.1:2", "127.0.0.1:2")])
    first, second = worker.servers
    assert (first.healthy, first.weight, first.effective_weight) == (True, 4, 1.0)
    assert not second.healthy  # ejected here: the snapshot already on its way does not undo it
    assert worker.version == version + 1 and worker.candidates() == (first,)
    apply_snapshot({"p": worker}, snapshot({"p": view}, 2), held=[])
    assert second.healthy and worker.version == version + 2
    apply_snapshot({"p": worker}, snapshot({"p": view}, 3), held=[])
    assert worker.version == version + 2  # nothing changed: the strategies keep their tables
    with pytest.raises(ValueError, match="out of range"):
        apply_snapshot({"p": worker}, {"pools": {"p": [["127.0.0.1:1", "127.0.0.1:1", 1, 0, 1, 9.0]]}}, [])


@pytest.mark.slow
def test_a_port_in_use_is_reported_once_by_the_supervisor_before_any_worker(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "anubis.toml"
        write_config(config, port, free_port(), ["127.0.0.1:3"])
        result = run_cli("run", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.count(f"binding 127.0.0.1:{port}") == 1, result.stderr
    assert "worker 1 started" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("decoy_in", "flags"), [("cwd", []), ("PYTHONPATH", ["-I"]), ("PYTHONPATH", ["-E"])])
async def test_workers_run_the_supervisors_package_wherever_another_one_is(
    nursery: trio.Nursery, tmp_path: Path, decoy_in: str, flags: list[str]
) -> None:
    """A `trioanubis` the workers' path would find first is not what they import: not one in the
    working directory (a checkout, another version; `python -m` in the workers' command once put it
    first), nor one on a PYTHONPATH the supervisor ignores (`-I`, `-E`: the workers run with the
    supervisor's flags). They run the package the supervisor imported, here from a tree it put on
    its path at run time."""
    decoy = tmp_path / "decoy" / "trioanubis"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('the decoy trioanubis was imported')\n")
    backend = await start_backend(nursery, name_handler("real"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address], access_log=False)
    start = (f"import sys, runpy; sys.path.insert(0, {str(ROOT)!r}); "
             "runpy.run_module('trioanubis', run_name='__main__')")  # fmt: skip
    # The decoy first, then the supervisor's own tree: a path that holds the package, behind another.
    path = os.pathsep.join([str(decoy.parent), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path} if decoy_in == "PYTHONPATH" else None
    cwd = decoy.parent if decoy_in == "cwd" else tmp_path
    supervisor_start = [sys.executable, *flags, "-c", start]
    async with anubis("run", "-c", str(config), cwd=cwd, command=supervisor_start, env=env) as process:
        await all_serving(admin_port, 2)
        assert await request(Address("127.0.0.1", port)) == b"real"
    assert "was imported" not in await process_stderr(process)


@pytest.mark.slow
async def test_without_so_reuseport_the_workers_share_the_supervisors_listening_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The path for platforms where SO_REUSEPORT does not balance, forced here: inherited sockets."""
    from trioanubis.workers.sockets import Holds
    from trioanubis.workers.supervisor import Supervisor, read_config

    backend = await start_backend(nursery, name_handler("shared"))
    admin_port = free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, 0, admin_port, [backend.address], access_log=False)
    text, parsed = read_config(str(config))
    supervisor = Supervisor(parsed, text, count=2, log_level="warning")
    supervisor.holds = Holds(reuse_port=False)
    async with trio.open_nursery() as inner:
        bound = await inner.start(supervisor.run)
        address = bound["web"]
        assert address.port != 0
        for _ in range(50):
            assert await request(address) == b"shared"
        doc = await stats(admin_port)
        assert sum(w["accepted"] for w in doc["workers"]) == 50
        supervisor.stop()
    assert all(w["pid"] is None or gone(w["pid"]) for w in doc["workers"])


@pytest.mark.slow
async def test_watch_reloads_every_worker_when_the_file_changes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [one.address], access_log=False)
    async with supervisor(config, "--watch") as process:
        await all_serving(admin_port, 2)
        write_config(config, port, admin_port, [two.address], access_log=False)
        os.utime(config, (1, 1))  # a different modification time, whatever the clock's resolution
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(EVENTUALLY):
            while b"reload applied in" not in seen:
                seen += await process.stderr.receive_some()
        assert b"reload applied in 2 of 2 workers" in seen
        assert {await request(Address("127.0.0.1", port)) for _ in range(20)} == {b"two"}
