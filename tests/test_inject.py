"""Injected network faults (proxy/faults.py, proxy/streams.py): parsing, the relay, real clients.

Not to be confused with test_faults.py, which is about the balancer *tolerating* failing backends.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect,
    echo_handler,
    free_port,
    name_handler,
    no_fd_leak,
    receive_all,
    relays,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import LiveBalancer, blocking_exchange, http, run_cli
from tests.peers import need
from trioanubis.config import FaultConfig, parse_bandwidth, parse_config, parse_faults, parse_size
from trioanubis.errors import ConfigError
from trioanubis.pool import Server
from trioanubis.proxy.faults import describe, draw
from trioanubis.proxy.io import epoll_available
from trioanubis.proxy.streams import QUEUE_BOUND

BACKENDS = ["portable", *(["epoll"] if epoll_available() else [])]


# ----------------------------------------------------------------- parsing


def test_sizes_and_rates_use_decimal_and_binary_units() -> None:
    assert parse_size("64KB") == 64_000
    assert parse_size("64KiB") == 65_536
    assert parse_size("1MiB") == 1 << 20
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("1B") == parse_size(1) == 1
    assert parse_bandwidth("1MB/s") == 1_000_000
    assert parse_bandwidth("512KiB/s") == 512 * 1024
    for bad in ("1 megabyte", "-1B", "1MB/m", "", True, 1.5, None, "1e9B", "2TiB"):
        with pytest.raises(ValueError):
            parse_size(bad) if not (isinstance(bad, str) and "/" in bad) else parse_bandwidth(bad)


def test_pool_and_server_faults_parse_and_errors_name_the_key() -> None:
    data = config_for([{"address": "127.0.0.1:1", "name": "a", "faults": {"refuse": True}}, "127.0.0.1:2"],
                      faults={"latency": "20ms", "jitter": "5ms", "direction": "downstream"})  # fmt: skip
    pool = parse_config(data, "t.toml").pools["test"]
    assert pool.faults == FaultConfig(direction="downstream", latency=0.02, jitter=0.005)
    assert pool.servers[0].faults == FaultConfig(refuse=True) and pool.servers[1].faults is None
    for faults, where in [
        ({"latency": "fast"}, "pools.test.faults.latency"),
        ({"bandwidth": "1MB"}, "pools.test.faults.bandwidth"),
        ({"probability": 2}, "pools.test.faults.probability"),
        ({"direction": "sideways"}, "pools.test.faults.direction"),
        ({"slice_delay": "1ms"}, "pools.test.faults.slice_delay"),
        ({"jitter": "5ms"}, "pools.test.faults.jitter"),
        ({"latncy": "5ms"}, "pools.test.faults.latncy"),
        ({"latency": "2h"}, "pools.test.faults.latency"),
        ({"reset_after": "lots"}, "pools.test.faults.reset_after"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"t.toml: {where}:")):
            parse_config(config_for(["127.0.0.1:1"], faults=faults), "t.toml")
    bad_server = config_for([{"address": "127.0.0.1:1", "faults": {"blackhole": "yes"}}])
    with pytest.raises(ConfigError, match=re.escape("pools.test.servers[0].faults.blackhole")):
        parse_config(bad_server, "t.toml")


@pytest.mark.slow
def test_anubis_check_rejects_bad_faults_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[listeners.a]\nbind = "127.0.0.1:0"\npool = "p"\n[pools.p]\nservers = ["127.0.0.1:1"]\n'
                   '[pools.p.faults]\nbandwidth = "fast"\n')  # fmt: skip
    result = run_cli("check", "-c", str(bad))
    assert result.returncode != 0 and "pools.p.faults.bandwidth" in result.stderr
    assert "Traceback" not in result.stderr
    bad.write_text(bad.read_text().replace('"fast"', '"1MB/s"\nlatency = "20ms"'))
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 0, result.stderr
    assert "FAULTS direction=both probability=1.0 latency=20ms bandwidth=1000000B/s" in result.stdout


fault_tables = st.fixed_dictionaries({}, optional={
    "direction": st.sampled_from(["upstream", "downstream", "both"]),
    "probability": st.floats(0, 1),
    "latency": st.integers(0, 60_000).map(lambda ms: f"{ms}ms"),
    "bandwidth": st.integers(0, 1 << 30).map(lambda n: f"{n}B/s"),
    "reset_after": st.integers(0, 1 << 30), "close_after": st.sampled_from(["1KB", "64KiB", "1MB"]),
    "blackhole": st.booleans(), "refuse": st.booleans(), "slice": st.integers(0, 100),
})  # fmt: skip


@pytest.mark.slow
@given(table=fault_tables)
def test_what_stats_shows_parses_back_to_the_same_faults(table: dict[str, Any]) -> None:
    faults = parse_faults(table)
    shown = describe(faults if faults.active else None)
    if shown is not None:
        assert parse_faults(shown) == faults


@pytest.mark.slow
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(["latency", "slice", "refuse", "x"]), inner,
                                            max_size=3), max_leaves=8))  # fmt: skip
def test_any_json_is_a_faults_table_or_a_config_error(value: object) -> None:
    try:
        parse_faults(value)
    except ConfigError as exc:
        assert str(exc).startswith("admin request: faults")


def test_probability_picks_about_that_fraction_of_connections() -> None:
    server = Server(parse_config(config_for(["127.0.0.1:1"])).pools["test"].servers[0])
    faults = FaultConfig(latency=0.01, probability=0.25)
    rng = random.Random(7)
    drawn = sum(draw(faults, server, rng) is not None for _ in range(4000))
    assert 800 < drawn < 1200
    assert server.faults_applied == {"latency": drawn}
    assert draw(FaultConfig(latency=0.01, direction="upstream"), server, rng).downstream.latency == 0  # type: ignore[union-attr]


# ------------------------------------------------------------- the relay


def faulted(servers: list[Any], io: str = "", **faults: Any) -> dict[str, Any]:
    data = config_for(servers, faults=faults)
    data["admin"] = {"bind": "127.0.0.1:0"}
    if io:
        data["settings"] = {"io": io}
    return data


@pytest.mark.slow
@pytest.mark.parametrize("io", BACKENDS)
async def test_latency_jitter_and_slices_keep_every_byte_in_order(nursery: trio.Nursery, io: str) -> None:
    backend = await start_backend(nursery, echo_handler)
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(300_000))
    cases: list[dict[str, Any]] = [
        {"latency": "30ms", "jitter": "20ms"},
        {"slice": "7B"},
        {"slice": "1B", "slice_delay": "1ms"},
        {"bandwidth": "4MB/s", "latency": "5ms"},
    ]
    for faults in cases:
        # Sliced, every piece is a write and a wake-up: a few thousand pieces show the order is kept.
        size = {"1B": 3000, "7B": 30_000}.get(faults.get("slice", ""), len(payload))
        async with running_balancer(faulted([backend.address], io, **faults)) as (balancer, address):
            assert await request(address, payload[:size]) == payload[:size]
            server = balancer.pools["test"].servers[0]
            assert set(server.faults_applied) == {k for k in faults if k != "slice_delay"}
            await wait_until(lambda: balancer.access.counts.get("client_eof") == 1)


@pytest.mark.slow
@pytest.mark.parametrize("io", BACKENDS)
@pytest.mark.parametrize(
    "faults", [{"latency": "2ms", "jitter": "1ms"}, {"slice": "61B"}], ids=["latency", "slice"]
)
async def test_faulted_streams_pass_trios_half_closeable_stream_checks(
    nursery: trio.Nursery, io: str, faults: dict[str, Any]
) -> None:
    """trio.testing's conformance suite on (client, backend) pairs relayed by the faulted path."""
    accepted: list[trio.SocketStream] = []
    arrived = trio.lowlevel.ParkingLot()

    async def hand_over(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        arrived.unpark_all()
        await trio.sleep_forever()

    backend = await start_backend(nursery, hand_over)
    async with running_balancer(faulted([backend.address], io, **faults)) as (_, address):

        async def stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
            client = await connect(address)
            while not accepted:
                await arrived.park()
            return client, accepted.pop()

        await trio.testing.check_half_closeable_stream(stream_pair, None)


@pytest.mark.slow
async def test_latency_delays_each_exchange_without_serialising_pipelined_ones(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    async with running_balancer(faulted([backend.address], latency="100ms", direction="upstream")) as (_, a):
        stream = await connect(a)
        async with stream:
            started = trio.current_time()
            for i in range(20):  # pipelined: all in flight at once, each delayed once
                await stream.send_all(b"%02d" % i)
            got = b""
            while len(got) < 40:
                got += await stream.receive_some(100)
            elapsed = trio.current_time() - started
    assert got == b"".join(b"%02d" % i for i in range(20))
    assert 0.1 <= elapsed < EVENTUALLY  # delayed at least once (no upper timing bound worth asserting)


@pytest.mark.slow
@pytest.mark.parametrize("io", BACKENDS)
async def test_latency_queue_is_bounded_so_the_server_is_pushed_back(nursery: trio.Nursery, io: str) -> None:
    payload = random.Random(2).randbytes(8 << 20)
    done = trio.Event()

    async def firehose(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(payload)
            await stream.send_eof()
            done.set()

    backend = await start_backend(nursery, firehose)
    async with running_balancer(faulted([backend.address], io, latency="20ms")) as (balancer, address):
        stream = await connect(address)  # and does not read, for now
        async with stream:
            await wait_until(lambda: any(r.down.held for r in relays(balancer)))
            relay = relays(balancer)[0]
            for _ in range(20):
                await trio.testing.wait_all_tasks_blocked(0.01)
                assert relay.down.held <= QUEUE_BOUND
            assert not done.is_set() and relay.down.bytes < len(payload)  # pushed back on the server
            assert await receive_all(stream, len(payload)) == payload  # and nothing was lost


@pytest.mark.slow
async def test_blackhole_reads_and_drops(nursery: trio.Nursery) -> None:
    got: list[bytes] = []

    async def recorder(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                got.append(data)
        except trio.BrokenResourceError:  # reset when the balancer stops
            pass

    backend = await start_backend(nursery, recorder)
    async with running_balancer(faulted([backend.address], blackhole=True, direction="upstream")) as (b, a):
        stream = await connect(a)
        async with stream:
            await stream.send_all(b"into the void" * 1000)
            await wait_until(lambda: b.pools["test"].servers[0].faults_applied.get("blackhole") == 1)
            with trio.move_on_after(0.3):
                assert await stream.receive_some(10) == b"never"  # nothing comes back
        assert not got


@pytest.mark.parametrize("io", BACKENDS)
async def test_reset_after_gives_exactly_that_many_bytes_then_econnreset(
    nursery: trio.Nursery, io: str
) -> None:
    async def talker(stream: trio.SocketStream) -> None:
        with trio.move_on_after(EVENTUALLY), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"y" * 1_000_000)  # reset by the fault, on purpose

    backend = await start_backend(nursery, talker)
    async with running_balancer(faulted([backend.address], io, reset_after="64KiB")) as (balancer, address):
        stream = await connect(address)
        received = 0
        with pytest.raises(trio.BrokenResourceError) as failure:
            async with stream:
                while data := await stream.receive_some(65536):
                    received += len(data)
        assert isinstance(failure.value.__cause__, ConnectionResetError)
        assert received == 65536
        await wait_until(lambda: balancer.access.counts.get("fault_reset") == 1)
        _, _, body = await http(balancer.admin.bound, "GET", "/metrics")  # type: ignore[union-attr, arg-type]
        assert 'anubis_faults_applied_total{pool="test",server="' in body.decode()
        assert 'fault="reset_after"} 1' in body.decode()


async def test_close_after_is_a_clean_close_after_that_many_bytes(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = faulted([backend.address], close_after="10KB", direction="downstream")
    async with running_balancer(data) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(b"z" * 50_000)
            got = await receive_all(stream)
        assert got == b"z" * 10_000
        await wait_until(lambda: balancer.access.counts.get("fault_close") == 1)


@pytest.mark.slow
async def test_faulted_connections_leave_no_descriptor_behind(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    kinds: list[dict[str, Any]] = [
        {"reset_after": "1KB"},
        {"close_after": "1KB", "direction": "downstream"},
        {"blackhole": True},
        {"latency": "1ms", "slice": "100B"},
        {"refuse": True},
    ]
    with no_fd_leak():
        for faults in kinds:
            async with running_balancer(faulted([backend.address], **faults)) as (balancer, address):
                for _ in range(1 if "blackhole" in faults else 3):  # a blackhole hangs till cut off
                    await exchange_or_fault(address, b"q" * 5000)
                assert balancer.pools["test"].servers[0].faults_applied
            await wait_until(lambda: backend.active == 0)


async def test_refuse_drives_failover_to_another_server(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    servers = [{"address": one.address, "name": "one", "faults": {"refuse": True}},
               {"address": two.address, "name": "two"}]  # fmt: skip
    data = config_for(servers, eject_after=0)
    async with running_balancer(data) as (balancer, address):
        answers = [await request(address) for _ in range(6)]
    assert answers == [b"two"] * 6 and one.connections == 0
    assert balancer.pools["test"].servers[0].faults_applied["refuse"] >= 3


async def test_least_time_sees_the_injected_latency(nursery: trio.Nursery) -> None:
    fast = await start_backend(nursery, echo_handler)
    slow = await start_backend(nursery, echo_handler)
    servers = [{"address": fast.address, "name": "fast"},
               {"address": slow.address, "name": "slow", "faults": {"latency": "50ms"}}]  # fmt: skip
    async with running_balancer(config_for(servers, strategy="least_time")) as (balancer, address):
        for _ in range(6):
            assert await request(address) == b"ping"
        fast_server, slow_server = balancer.pools["test"].servers
        await wait_until(lambda: slow_server.ewma is not None and fast_server.ewma is not None)
        assert slow_server.ewma > fast_server.ewma  # type: ignore[operator]
        assert slow_server.ewma >= 0.05  # type: ignore[operator]


async def test_runtime_faults_apply_to_new_connections_only(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([{"address": backend.address, "name": "one"}])
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (balancer, address):
        admin = balancer.admin.bound  # type: ignore[union-attr]
        assert admin is not None
        before = await connect(address)  # no faults: keeps none
        put = b'{"close_after": "5B", "direction": "downstream"}'
        status, _, body = await http(admin, "PUT", "/pools/test/servers/one/faults", put)
        assert status == 200 and json.loads(body)["faults"]["close_after"] == "5B"
        stats = json.loads((await http(admin, "GET", "/stats"))[2])
        assert stats["pools"][0]["servers"][0]["faults"]["close_after"] == "5B"
        during = await connect(address)  # drew close_after: keeps it after the DELETE
        status, _, body = await http(admin, "DELETE", "/pools/test/servers/one/faults")
        assert status == 200 and json.loads(body)["faults"] is None
        after = await connect(address)
        for stream, expected in ((before, b"0123456789"), (during, b"01234"), (after, b"0123456789")):
            async with stream:
                await stream.send_all(b"0123456789")
                await stream.send_eof()
                assert await receive_all(stream) == expected
        bad = await http(admin, "PUT", "/pools/test/servers/one/faults", b'{"latency": "soon"}')
        assert bad[0] == 400 and b"faults.latency" in bad[2]
        assert (await http(admin, "PUT", "/pools/test/servers/nope/faults", b"{}"))[0] == 404
        assert (await http(admin, "POST", "/pools/test/servers/one/faults", b"{}"))[0] == 405


async def test_reload_keeps_runtime_faults_unless_the_file_changes_them(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([{"address": backend.address, "name": "one"}])
    async with running_balancer(data) as (balancer, _):
        server = balancer.pools["test"].servers[0]
        balancer.pools["test"].set_faults(server, FaultConfig(latency=0.01))
        await balancer.apply_config(parse_config(data))
        assert server.faults == FaultConfig(latency=0.01)
        changed = config_for([{"address": backend.address, "name": "one", "faults": {"slice": 3}}])
        await balancer.apply_config(parse_config(changed))
        assert server.faults == FaultConfig(slice=3)


fault_values = st.fixed_dictionaries({}, optional={
    key: st.sampled_from(["1ms", "64KB", "1MB/s", "1B", -1, 0, 0.5, 2, True, "x", "nan", [1], {"a": 1}])
    for key in ("direction", "probability", "latency", "jitter", "bandwidth", "reset_after", "close_after",
                "blackhole", "refuse", "slice", "slice_delay", "other")
})  # fmt: skip
small_faults = fault_tables.map(lambda t: {**t, "latency": "5ms"} if "latency" in t else t)


async def exchange_or_fault(address: Any, payload: bytes = b"ping") -> None:
    """One request through whatever faults are set: any ending is fine, hanging is cut off."""
    with trio.move_on_after(3), contextlib.suppress(trio.BrokenResourceError, OSError):
        await request(address, payload)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(small_faults, fault_values), st.one_of(small_faults, fault_values), st.booleans())
async def test_every_accepted_faults_config_runs_and_reloads(
    first: dict[str, Any], second: dict[str, Any], on_server: bool
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)

        def config(faults: dict[str, Any] | None) -> dict[str, Any]:
            if faults is None:
                return config_for([backend.address])
            if on_server:
                return config_for([{"address": backend.address, "faults": faults}])
            return config_for([backend.address], faults=faults)

        try:
            parse_config(config(first), "t")
        except ConfigError as exc:
            assert re.match(r"t: pools\.test\.(servers\[0\]\.)?faults", str(exc)), exc
            nursery.cancel_scope.cancel()
            return
        async with running_balancer(config(first)) as (balancer, address):
            await exchange_or_fault(address)
            with contextlib.suppress(ConfigError):
                await balancer.apply_config(parse_config(config(second), "t"))
            await exchange_or_fault(address)
            await balancer.apply_config(parse_config(config(None), "t"))
            if on_server:  # a server's own table left the file: back to the pool's (none)
                assert balancer.pools["test"].servers[0].faults is None
            assert await request(address) == b"ping"
            assert not balancer.stopped.is_set()
        nursery.cancel_scope.cancel()


# ---------------------------------------------- hostile admin input, fuzzed


bodies = st.one_of(
    fault_tables.map(lambda t: json.dumps(t).encode()),
    st.dictionaries(
        st.sampled_from(["latency", "bandwidth", "slice", "probability", "refuse", "zz"]),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        max_size=4,
    ).map(lambda t: json.dumps(t).encode()),
    st.binary(max_size=300),
    st.integers(1, 6000).map(lambda n: b"[" * n),
    st.integers(1, 2000).map(lambda n: b'{"latency": ' * n),
)


@pytest.mark.slow
@given(method=st.sampled_from(["PUT", "PUT", "PUT", "DELETE", "GET", "PATCH"]), body=bodies)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_fault_requests_never_stop_a_running_balancer(
    live_balancer: LiveBalancer, method: str, body: bytes
) -> None:
    answer = live_balancer.admin_request(method, "/pools/web/servers/one/faults", body)
    status = int(answer.split(b" ", 2)[1])
    assert status in (200, 400, 405, 413), answer
    assert live_balancer.process.poll() is None, live_balancer.stderr.read_text()[-3000:]
    cleared = live_balancer.admin_request("DELETE", "/pools/web/servers/one/faults")
    assert cleared.startswith(b"HTTP/1.1 200 OK\r\n"), cleared
    proxied = blocking_exchange(live_balancer.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"hello from one" in proxied
    assert b"Traceback" not in live_balancer.stderr.read_bytes()


# ------------------------------------------------------------ real clients


def redis_latency_ms(port: int) -> float:
    """redis-benchmark's average latency in ms for PING_INLINE, one client, no pipelining."""
    result = subprocess.run(
        [need("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n", "60", "-t", "ping",
         "--csv"], capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    rows = [line.split('","') for line in result.stdout.splitlines() if line.startswith('"PING')]
    header = next(line for line in result.stdout.splitlines() if line.startswith('"test"')).split('","')
    return float(rows[0][header.index("avg_latency_ms")].strip('"'))


@pytest.mark.slow
async def test_redis_benchmark_sees_the_injected_latency(nursery: trio.Nursery, tmp_path: Path) -> None:
    redis_port = free_port()
    command = [need("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    redis = await nursery.start(
        lambda task_status: trio.run_process(command, stdout=subprocess.DEVNULL, task_status=task_status)
    )
    try:
        servers = [{"address": f"127.0.0.1:{redis_port}", "name": "redis"}]
        async with running_balancer(config_for(servers)) as (_, plain), \
                running_balancer(config_for(servers, faults={"latency": "20ms"})) as (_, slow):  # fmt: skip
            await wait_until(lambda: _answers(redis_port))
            base = await trio.to_thread.run_sync(redis_latency_ms, plain.port)
            delayed = await trio.to_thread.run_sync(redis_latency_ms, slow.port)
        assert delayed >= base + 15, (base, delayed)  # each request delayed 20 ms upstream + 20 downstream
        assert delayed < base + 20 * 2 * 20  # a generous ceiling: nothing runs away
    finally:
        redis.terminate()


def _answers(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
async def test_curl_downloads_at_the_bandwidth_limit(nursery: trio.Nursery) -> None:
    body = b"b" * (4 << 20)

    async def http_server(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        await stream.send_all(head + body)
        await stream.aclose()

    backend = await start_backend(nursery, http_server)
    data = config_for([backend.address], faults={"bandwidth": "1MB/s", "direction": "downstream"})
    async with running_balancer(data) as (_, address):
        started = time.monotonic()
        url = f"http://127.0.0.1:{address.port}/"
        command = [need("curl"), "-sS", "-o", "/dev/null", "-w", "%{size_download}", url]
        result = await trio.run_process(command, capture_stdout=True)
        elapsed = time.monotonic() - started
    assert int(result.stdout) == len(body)
    assert elapsed >= 3.0  # 4 MiB at 1 MB/s: about 4.2 s; a lower bound only
