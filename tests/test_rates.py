"""Bandwidth limits (proxy/rates.py, proxy/budgets.py): per connection, per client, through every transport.

The pure parts (the token bucket, the bounded table of per-client budgets) are checked with explicit
clocks; the rest on real sockets through a running balancer, where what the limits did is read from
their accounting (bytes taken, waits asked for), never from the wall clock: speed lives in
bench/traffic.py.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    echo_handler,
    echo_round_trip,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import connect_from
from tests.tlscerts import Authority
from trioanubis.app import Balancer
from trioanubis.config import ConfigError, parse_config
from trioanubis.proxy import rates
from trioanubis.proxy.budgets import BURST_SECONDS, Bucket, ClientBudgets
from trioanubis.proxy.relay import Relay
from trioanubis.proxy.streams import StreamRelay
from trioanubis.summary import describe

# ------------------------------------------------------------------ the bucket


def test_a_fresh_bucket_lets_half_a_second_through_then_asks_to_wait() -> None:
    bucket = Bucket(1000, now=0.0)
    assert bucket.take(500, 0.0) == 0.0  # the burst: half a second of the rate
    assert bucket.take(100, 0.0) == pytest.approx(0.1)  # then 100 bytes at 1000 B/s
    assert bucket.take(100, 0.0) == pytest.approx(0.2)  # queued behind the first debt
    assert bucket.take(100, 10.0) == 0.0  # refilled, never beyond the burst
    assert bucket.tokens == pytest.approx(400)
    assert bucket.taken == 800 and bucket.waited == pytest.approx(0.3)


def finish_times(rate: int, takers: int, size: int, step: int) -> list[float]:
    """When each of `takers` connections sharing one bucket has sent `size` bytes in `step` pieces,
    taking turns, each sending a piece the moment its wait is over (a virtual clock)."""
    bucket = Bucket(rate, now=0.0)
    clock = [0.0] * takers
    left = [size] * takers
    while any(left):
        i = min((t for t in range(takers) if left[t]), key=lambda t: clock[t])
        piece = min(step, left[i])
        clock[i] += bucket.take(piece, clock[i])
        left[i] -= piece
    return clock


def test_two_connections_sharing_a_budget_take_twice_as_long_as_one() -> None:
    rate, size = 1_000_000, 4 << 20
    alone = max(finish_times(rate, 1, size, rate // 20))
    shared = max(finish_times(rate, 2, size, rate // 20))
    assert alone == pytest.approx((size - rate * BURST_SECONDS) / rate)
    assert shared == pytest.approx((2 * size - rate * BURST_SECONDS) / rate)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 1 << 40), takes=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 1 << 20)),
                                                    min_size=1, max_size=50))  # fmt: skip
def test_what_passes_a_bucket_stays_within_rate_times_time_plus_the_burst(
    rate: int, takes: list[tuple[float, int]]
) -> None:
    """Whoever takes, whenever: over any span, from one take to the moment a later taker may send,
    the bucket lets through at most rate × that span + burst."""
    bucket = Bucket(rate, now=0.0)
    now = 0.0
    taken: list[tuple[float, int]] = []  # (when taken, size)
    for gap, size in takes:
        now += gap
        sent_at = now + bucket.take(size, now)
        taken.append((now, size))
        for i, (start, _) in enumerate(taken):
            through = sum(size for _, size in taken[i:])
            assert through <= rate * (sent_at - start) + bucket.burst + 1e-6 * max(through, 1)


# ------------------------------------------------------------------ the table of client budgets


def test_a_client_keeps_its_budget_across_its_connections_and_after_them_until_it_is_full() -> None:
    table = ClientBudgets(1000, 0)
    first = table.acquire("10.0.0.1", 0.0)
    second = table.acquire("10.0.0.1", 0.0)
    other = table.acquire("10.0.0.2", 0.0)
    assert first is second and first is not other and first.down is None
    assert table.active == {"10.0.0.1": 2, "10.0.0.2": 1}
    assert first.up is not None
    first.up.take(800, 0.0)  # its burst and more: a debt
    for budget in (first, second, other):
        table.release(budget, 0.0)
    assert table.active == {} and len(table) == 1  # 10.0.0.2 was full; 10.0.0.1 owes
    assert table.acquire("10.0.0.1", 0.1) is first  # reconnecting does not buy a fresh burst
    table.release(first, 0.1)
    table.acquire("10.0.0.3", 5.0)  # long after: the debt is paid, the entry is forgotten
    assert len(table) == 1


def test_the_table_is_bounded_whatever_addresses_arrive() -> None:
    table = ClientBudgets(1000, 1000, capacity=3)
    held = [table.acquire(f"10.0.0.{i}", 0.0) for i in range(3)]
    outside = table.acquire("10.0.0.9", 0.0)  # every entry has connections: a budget of its own
    assert table.untracked == 1 and len(table) == 3 and "10.0.0.9" not in table.active
    table.release(outside, 0.0)
    assert len(table) == 3
    for budget in held:
        assert budget.up is not None
        budget.up.take(1000, 0.0)  # in debt: kept after release
        table.release(budget, 0.0)
    table.acquire("10.0.0.10", 0.0)
    assert table.evicted == 1 and len(table) == 3


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans(), st.floats(0, 2)), max_size=200))
def test_any_sequence_of_connections_leaves_the_table_bounded_and_empty_of_users(
    steps: list[tuple[int, bool, float]]
) -> None:
    table = ClientBudgets(100, 50, capacity=8)
    open_: list[Any] = []
    now = 0.0
    for client, opens, gap in steps:
        now += gap
        if opens or not open_:
            budget = table.acquire(f"10.1.0.{client}", now)
            assert budget.up is not None
            budget.up.take(client * 10, now)
            open_.append(budget)
        else:
            table.release(open_.pop(client % len(open_)), now)
        assert len(table) <= 8
    for budget in open_:
        table.release(budget, now)
    assert table.active == {}


# ------------------------------------------------------------------ through the balancer


def limited(backend: str, **keys: Any) -> dict[str, Any]:
    listener = keys.pop("listener", {})
    return config_for([backend], listener=listener, **keys)


async def test_a_limited_download_delivers_every_byte_in_order_and_waits_for_the_rest(
    nursery: trio.Nursery,
) -> None:
    backend = await start_backend(nursery, echo_handler)
    payload = os.urandom(300_000)
    async with running_balancer(limited(backend.address, download_rate="1MB/s")) as (balancer, address):
        assert await request(address, payload) == payload
        state = rates.state_of(balancer.pools["test"])
    assert state.connections == 1
    assert state.bytes == [0, len(payload)]  # only the download is limited
    # 300 kB at 1 MB/s, 500 kB of burst: no wait; the accounting says so rather than a clock.
    assert state.waited == [0.0, 0.0]


async def test_a_limit_a_reload_adds_or_removes_applies_to_the_next_connection(nursery: trio.Nursery) -> None:
    """The pool keeps whether it limits (`Pool.rate_limited`) in step with its config at each reload."""
    backend = await start_backend(nursery, echo_handler)
    plain, rated = limited(backend.address), limited(backend.address, download_rate="1MB/s")
    async with running_balancer(plain) as (balancer, address):
        pool = balancer.pools["test"]
        assert await request(address, b"first") == b"first"
        assert rates.state_of(pool).connections == 0
        await balancer.apply_config(parse_config(rated, "rated.toml"))
        assert balancer.pools["test"] is pool  # kept, reconfigured
        assert await request(address, b"second") == b"second"
        assert rates.state_of(pool).connections == 1
        await balancer.apply_config(parse_config(plain, "plain.toml"))
        assert await request(address, b"third") == b"third"
        assert rates.state_of(pool).connections == 1


async def test_past_the_burst_the_limit_asks_for_the_time_the_bytes_need(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    payload = os.urandom(120_000)
    async with running_balancer(limited(backend.address, upload_rate="200KB/s")) as (balancer, address):
        assert await request(address, payload) == payload
        state = rates.state_of(balancer.pools["test"])
    # 120 kB at 200 kB/s with 100 kB of burst: the last 20 kB waited, never more than the 0.1 s
    # they need (less by what the bucket refilled while the first 100 kB went).
    assert state.bytes == [len(payload), 0]
    assert 0 < state.waited[0] <= 0.1 + 1e-9 and state.waited[1] == 0


async def relay_of(balancer: Balancer) -> Any:
    await wait_until(lambda: any(c.relay is not None for c in balancer.timer.connections))
    return next(c.relay for c in balancer.timer.connections if c.relay is not None)


async def test_splice_stays_on_where_no_limit_applies(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = limited(backend.address)
    data["pools"]["slow"] = {"servers": [backend.address], "health": {"check": "none"},
                             "download_rate": "1MB/s"}  # fmt: skip
    data["listeners"]["slow"] = {"bind": "127.0.0.1:0", "pool": "slow"}
    async with running_balancer(data) as (balancer, address):
        slow = balancer.listeners["slow"].bound
        assert slow is not None
        for where, kind in ((address, Relay), (slow, StreamRelay)):
            async with await trio.open_tcp_stream(where.host, where.port) as stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                assert isinstance(await relay_of(balancer), kind)
            await wait_until(lambda: not balancer.timer.connections)


async def test_a_listener_rate_and_a_pool_rate_the_tighter_applies(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = limited(backend.address, download_rate="2MB/s", upload_rate="3MB/s",
                   listener={"download_rate": "1MB/s", "upload_rate": "5MB/s"})  # fmt: skip
    async with running_balancer(data) as (balancer, address), \
            await trio.open_tcp_stream(address.host, address.port) as stream:  # fmt: skip
        await stream.send_all(b"x")
        assert await stream.receive_some(1) == b"x"
        relay = await relay_of(balancer)
        (up,), (down,) = relay.up.filters, relay.down.filters
        assert (up.bucket.rate, down.bucket.rate) == (3_000_000, 1_000_000)
        assert (up.step, down.step) == (150_000, 50_000)  # a twentieth of a second each


async def test_a_client_s_connections_share_one_budget_and_other_clients_have_their_own(
    nursery: trio.Nursery,
) -> None:
    """Two connections of 127.0.0.2 take from one bucket (its accounting holds both transfers), a
    connection of 127.0.0.3 from another, and once they end no budget has a user."""
    backend = await start_backend(nursery, echo_handler)
    data = limited(backend.address, download_rate_per_client="1MB/s")
    sizes = {("127.0.0.2", 0): 200_000, ("127.0.0.2", 1): 300_000, ("127.0.0.3", 0): 150_000}
    async with running_balancer(data) as (balancer, address):
        state = rates.state_of(balancer.pools["test"])
        streams = {key: await connect_from(key[0], address) for key in sizes}
        for stream in streams.values():
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        table = state.budgets
        assert table is not None and table.active == {"127.0.0.2": 2, "127.0.0.3": 1}
        now = trio.current_time()
        budgets = {client: table.acquire(client, now) for client in ("127.0.0.2", "127.0.0.3")}
        for budget in budgets.values():
            table.release(budget, trio.current_time())  # a look inside: the same objects the relays hold
        async with trio.open_nursery() as transfers:
            for key, stream in streams.items():
                transfers.start_soon(echo_exchange, stream, os.urandom(sizes[key]))
        await wait_until(lambda: table.active == {})
    first, second = budgets["127.0.0.2"].down, budgets["127.0.0.3"].down
    assert first is not None and second is not None
    assert first.taken == 1 + 200_000 + 1 + 300_000  # both connections' bytes went through one bucket
    assert second.taken == 1 + 150_000


async def echo_exchange(stream: trio.SocketStream, payload: bytes) -> None:
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        assert await receive_all(stream) == payload


async def test_limits_apply_through_tls_termination_and_a_proxy_header(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The client behind a PROXY header is the one budgeted; the bytes through TLS arrive intact."""
    ca = Authority(tmp_path)
    pair = ca.issue("localhost")
    backend = await start_backend(nursery, echo_handler)
    data = limited(backend.address, upload_rate_per_client="2MB/s", download_rate="1MB/s",
                   listener={"tls": {"cert": pair.cert, "key": pair.key}})  # fmt: skip
    data["listeners"]["proxied"] = {"bind": "127.0.0.1:0", "pool": "test", "accept_proxy": True,
                                    "proxy_trusted": ["127.0.0.0/8"]}  # fmt: skip
    payload = os.urandom(100_000)
    async with running_balancer(data) as (balancer, address):
        context = ssl.create_default_context(cafile=ca.pair.cert)
        raw = await trio.open_tcp_stream(address.host, address.port)
        async with trio.SSLStream(raw, context, server_hostname="localhost") as tls:
            await tls.send_all(payload)
            received = b""
            while len(received) < len(payload):
                received += await tls.receive_some(65536)
        assert received == payload
        proxied = balancer.listeners["proxied"].bound
        assert proxied is not None
        stream = await trio.open_tcp_stream(proxied.host, proxied.port)
        await stream.send_all(b"PROXY TCP4 10.7.0.1 10.0.0.9 1234 80\r\nhello")
        assert await stream.receive_some(5) == b"hello"
        table = rates.state_of(balancer.pools["test"]).budgets
        assert table is not None and table.active == {"10.7.0.1": 1}
        await stream.aclose()
        await wait_until(lambda: table.active == {})
        assert rates.state_of(balancer.pools["test"]).bytes[0] == len(payload) + 5


async def test_stats_metrics_and_the_summary_name_the_limits(nursery: trio.Nursery) -> None:
    from trioanubis.ops.metrics import prometheus, stats

    backend = await start_backend(nursery, echo_handler)
    data = limited(backend.address, download_rate_per_client="512KiB/s", upload_rate="1MB/s",
                   listener={"download_rate": "2MB/s"})  # fmt: skip
    async with running_balancer(data) as (balancer, address):
        await echo_round_trip(address, b"ping")
        await wait_until(lambda: not balancer.timer.connections)
        async with await trio.open_tcp_stream(address.host, address.port):  # a client with a budget
            await wait_until(lambda: rates.state_of(balancer.pools["test"]).connections == 2)
            shown = stats(balancer)["pools"][0]["bandwidth"]
            text = prometheus(balancer)
    assert shown["upload_rate"] == "1MB/s" and shown["download_rate_per_client"] == "512KiB/s"
    assert shown["limited_connections"] == 2 and shown["bytes"] == {"upload": 4, "download": 4}
    assert shown["tracked_clients"] == 1
    assert 'anubis_rate_limited_connections_total{pool="test"} 2' in text
    assert 'anubis_rate_limited_bytes_total{pool="test",direction="download"} 4' in text
    assert 'anubis_rate_limit_wait_seconds_total{pool="test",direction="upload"} 0' in text
    assert 'anubis_rate_limit_tracked_clients{pool="test"} 1' in text
    summary = describe(parse_config(data))
    assert "  bandwidth: upload 1MB/s per connection; download 512KiB/s per client" in summary
    assert "  bandwidth per connection: download 2MB/s" in summary


# ------------------------------------------------------------------ hostile config values

RATE_VALUES = st.one_of(
    st.integers(-(2**64), 2**64), st.floats(), st.booleans(), st.none(),
    st.sampled_from(["1MB/s", "512KiB/s", "0", "0B/s", "1B/s", "1TiB/s", "1025GiB/s", "1MB", "1 MB / s",
                     "-1MB/s", "1e3B/s", "MB/s", "1MB/m", "9" * 40 + "B/s", "1.5KB/s", "", "/s"]),
    st.from_regex(r"\A[0-9]{1,16}(\.[0-9]{1,4})?(B|KB|MB|GB|KiB|MiB|GiB|TiB)?(/s)?\Z"),
    st.text(max_size=12),
)  # fmt: skip
RATE_KEYS = [("pool", key) for key in ("upload_rate", "download_rate", "upload_rate_per_client",
                                       "download_rate_per_client")] + [
    ("listener", key) for key in ("upload_rate", "download_rate")]  # fmt: skip


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(RATE_KEYS), value=RATE_VALUES)
def test_a_hostile_rate_is_refused_on_one_line_or_runs_and_reloads(
    where: tuple[str, str], value: Any
) -> None:
    table, key = where
    data = config_for(["127.0.0.1:9"])
    target = data["listeners"]["test"] if table == "listener" else data["pools"]["test"]
    target[key] = value
    try:
        config = parse_config(data, "hostile.toml")
    except ConfigError as exc:
        message = str(exc)
        path = f"{'listeners' if table == 'listener' else 'pools'}.test.{key}"
        assert message.startswith(f"hostile.toml: {path}: ") and "\n" not in message and len(message) < 400
        return
    rate = getattr(config.listeners["test"] if table == "listener" else config.pools["test"], key)
    assert 0 <= rate <= 1 << 40
    trio.run(serve_and_reload, data, rate)


async def serve_and_reload(data: dict[str, Any], rate: int) -> None:
    """Run `data` (its server replaced by an echo), move bytes under the limit, reload away and back."""
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        data["pools"]["test"]["servers"] = [backend.address]
        config = parse_config(data, "hostile.toml")
        plain = parse_config(config_for([backend.address]), "plain.toml")
        balancer = Balancer(config)
        with trio.fail_after(EVENTUALLY):
            address = next(iter((await nursery.start(balancer.run)).values()))
            payload = os.urandom(min(100_000, max(1, rate // 4)) if rate else 100_000)  # within the burst
            assert await request(address, payload) == payload
            for again in (plain, config):
                await balancer.apply_config(again)
            assert await request(address, payload) == payload
        nursery.cancel_scope.cancel()


@pytest.mark.slow
def test_with_workers_stats_add_up_the_mirror_and_bandwidth_counters() -> None:
    """The supervisor's /stats (workers/merge.py) adds each worker's counters; settings stay as written."""
    from trioanubis.workers.merge import sum_stats

    def pool(connections: int, dropped: dict[str, int], waited: float) -> dict[str, Any]:
        mirrored = {"to": "shadow", "percent": 10, "connections": connections, "bytes": 5, "dropped": dropped}
        limits = {"download_rate": "1MB/s", "limited_connections": connections,
                  "bytes": {"upload": 1, "download": 2}, "waited_seconds": {"upload": waited, "download": 0}}
        return {"name": "p", "servers": [], "retired": [], "mirror": mirrored, "bandwidth": limits}

    view = {"pools": [pool(0, {}, 0.0)]}
    first, second = pool(3, {"lagging": 1}, 0.5), pool(4, {"lagging": 2, "cut": 1}, 0.25)
    workers = [(1, {"pools": [first]}), (2, {"pools": [second]})]
    (merged,) = sum_stats(view, workers)["pools"]
    assert merged["mirror"] == {"to": "shadow", "percent": 10, "connections": 7, "bytes": 10,
                                "dropped": {"lagging": 3, "cut": 1}}  # fmt: skip
    assert merged["bandwidth"]["limited_connections"] == 7 and merged["bandwidth"]["download_rate"] == "1MB/s"
    assert merged["bandwidth"]["bytes"] == {"upload": 2, "download": 4}
    assert merged["bandwidth"]["waited_seconds"] == {"upload": 0.75, "download": 0}
