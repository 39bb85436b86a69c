"""Mirroring (proxy/mirror.py): a copy of the client's bytes to a mirror, which never touches the primary.

Against real redis-servers (the primary and its mirror end up holding the same keys) and against
backends of our own that record what they got (the mirror receives exactly the client's bytes, in
order, with its half-close), refuse, never read or die; the client sees only the primary's answers and
never an error, and every dropped copy is counted. Throughput with a broken mirror is a measurement:
bench/traffic.py.
"""

from __future__ import annotations

import os
import random
import re
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect_when_listening,
    echo_handler,
    free_port,
    no_fd_leak,
    receive_all,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.peers import need
from tests.tlscerts import Authority
from trioanubis.app import Balancer
from trioanubis.config import Address, ConfigError, parse_config
from trioanubis.proxy import mirror
from trioanubis.proxy.io import epoll_available
from trioanubis.proxy.relay import Relay
from trioanubis.summary import describe


class Recorder:
    """A mirror that keeps every byte of each connection, answers noise, and notes the client's EOF."""

    def __init__(self) -> None:
        self.received: list[bytes] = []  # per connection, once it saw EOF
        self.connections = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        got = bytearray()
        try:
            while data := await stream.receive_some(65536):
                got += data
                await stream.send_all(b"MIRROR-NOISE")  # answers nobody may see
            self.received.append(bytes(got))
            await stream.send_all(b"MIRROR-BYE")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


async def never_reads(stream: trio.SocketStream) -> None:
    """A mirror that accepts and then reads nothing, ever."""
    await trio.sleep_forever()


def mirrored(primary: str, target: str, **pool: Any) -> dict[str, Any]:
    """One listener to pool `test` (servers: `primary`) mirroring to pool `shadow` (servers: `target`)."""
    data = config_for([primary], mirror="shadow", **pool)
    data["pools"]["shadow"] = {"servers": [target], "health": {"check": "none"}}
    return data


# ------------------------------------------------------------------ the copy is exact


@pytest.mark.slow
async def test_the_mirror_receives_exactly_the_client_s_bytes_in_order_and_its_half_close(
    nursery: trio.Nursery,
) -> None:
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    payloads = [os.urandom(n) for n in (1, 1000, 700_000, 65536 * 3 + 7)]
    async with running_balancer(mirrored(primary.address, shadow.address)) as (balancer, address):
        for payload in payloads:
            # request() half-closes after the payload and reads the answer to EOF: only the echo comes
            # back, never the mirror's noise, and the mirror's copy ends with the client's EOF.
            assert await request(address, payload) == payload
        await wait_until(lambda: len(recorder.received) == len(payloads))
        state = mirror.state_of(balancer.pools["test"])
        await wait_until(lambda: not balancer.pools["shadow"].servers[0].active)
    assert sorted(recorder.received, key=len) == sorted(payloads, key=len)
    assert state.connections == len(payloads) and state.bytes == sum(map(len, payloads))
    assert not any(state.dropped.values()), state.dropped
    assert balancer.pools["shadow"].servers[0].total == len(payloads)  # the mirror pool's slots, given back


@pytest.mark.slow
async def test_the_client_s_half_close_reaches_the_mirror_while_the_primary_is_open(
    nursery: trio.Nursery,
) -> None:
    """The primary answers only once the mirror has seen the client's EOF: the half-close is passed
    on as it happens, not by the close at the end."""
    recorder = Recorder()
    mirror_saw_eof = trio.Event()

    async def recorded(stream: trio.SocketStream) -> None:
        await recorder.handler(stream)
        mirror_saw_eof.set()

    async def primary_handler(stream: trio.SocketStream) -> None:
        async with stream:
            received = await receive_all(stream)
            await mirror_saw_eof.wait()
            await stream.send_all(b"after the mirror's EOF: " + received)

    primary = await start_backend(nursery, primary_handler)
    shadow = await start_backend(nursery, recorded)
    async with running_balancer(mirrored(primary.address, shadow.address)) as (_, address):
        with trio.fail_after(EVENTUALLY):
            assert await request(address, b"question") == b"after the mirror's EOF: question"
    assert recorder.received == [b"question"]


async def test_a_copy_outlives_a_short_primary_without_holding_it_up(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mirror's name resolves slowly: the primary has answered and closed before its mirror
    connects, and is not held open meanwhile; the copy is still delivered whole, with its FIN."""
    real_resolve = mirror.resolve_address
    resolved = trio.Event()

    async def slow_resolve(address: Any) -> Any:
        await resolved.wait()
        return await real_resolve(address)

    monkeypatch.setattr(mirror, "resolve_address", slow_resolve)
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    open_at_accept: list[int] = []
    balancers: list[Balancer] = []

    async def recorded(stream: trio.SocketStream) -> None:
        open_at_accept.append(len(balancers[0].timer.connections))
        await recorder.handler(stream)

    shadow = await start_backend(nursery, recorded)
    data = config_for([primary.address], mirror=f"localhost:{shadow.port}")
    async with running_balancer(data) as (balancer, address):
        balancers.append(balancer)
        assert await request(address, b"short") == b"short"
        await wait_until(lambda: not balancer.timer.connections)  # the primary is over and recorded
        resolved.set()
        await wait_until(lambda: recorder.received == [b"short"])
    assert open_at_accept == [0]
    assert not any(mirror.state_of(balancer.pools["test"]).dropped.values())


@pytest.mark.slow
async def test_a_pipelined_client_and_a_slow_primary_lose_no_byte_of_the_copy(nursery: trio.Nursery) -> None:
    """The client sends in many small writes while it reads; the copy is the concatenation."""
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    pieces = [os.urandom(random.randint(1, 3000)) for _ in range(300)]
    async with running_balancer(mirrored(primary.address, shadow.address)) as (_, address):
        async with await trio.open_tcp_stream(address.host, address.port) as stream, \
                trio.open_nursery() as both:  # fmt: skip
            both.start_soon(send_pieces, stream, pieces)
            echoed = await receive_all(stream)
        await wait_until(lambda: len(recorder.received) == 1)
    assert echoed == b"".join(pieces) == recorder.received[0]


async def exchange(address: Any, payload: bytes) -> bytes:
    """Send `payload` and half-close while reading the answer to its end (any size: no deadlock)."""
    async with await trio.open_tcp_stream(address.host, address.port) as stream, \
            trio.open_nursery() as both:  # fmt: skip
        both.start_soon(send_pieces, stream, [payload])
        return await receive_all(stream)


async def send_pieces(stream: trio.SocketStream, pieces: list[bytes]) -> None:
    for piece in pieces:
        await stream.send_all(piece)
    await stream.send_eof()


async def test_a_mirror_pool_that_wants_a_proxy_header_gets_one_naming_the_client(
    nursery: trio.Nursery,
) -> None:
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    data = mirrored(primary.address, shadow.address)
    data["pools"]["shadow"]["send_proxy"] = "v1"
    async with running_balancer(data) as (_, address):
        stream = await trio.open_tcp_stream(address.host, address.port)
        client_port = stream.socket.getsockname()[1]
        async with stream:
            await stream.send_all(b"hello")
            await stream.send_eof()
            assert await receive_all(stream) == b"hello"
        await wait_until(lambda: len(recorder.received) == 1)
    header = f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {address.port}\r\n".encode()
    assert recorder.received[0] == header + b"hello"


@pytest.mark.slow
async def test_a_tls_terminated_connection_is_mirrored_in_clear(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("localhost")
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    data = mirrored(primary.address, shadow.address, listener={"tls": {"cert": pair.cert, "key": pair.key}})
    payload = os.urandom(50_000)
    async with running_balancer(data) as (_, address):
        raw = await trio.open_tcp_stream(address.host, address.port)
        context = ssl.create_default_context(cafile=ca.pair.cert)
        async with trio.SSLStream(raw, context, server_hostname="localhost") as tls:
            await tls.send_all(payload)
            received = b""
            while len(received) < len(payload):
                received += await tls.receive_some(65536)
        assert received == payload
        await wait_until(lambda: len(recorder.received) == 1)
    assert recorder.received[0] == payload


@pytest.mark.slow
async def test_a_mirror_given_as_host_and_port_by_name_is_resolved(nursery: trio.Nursery) -> None:
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    data = config_for([primary.address], mirror=f"localhost:{shadow.port}")
    async with running_balancer(data) as (_, address):
        for payload in (b"one", b"two"):
            assert await request(address, payload) == payload
        await wait_until(lambda: len(recorder.received) == 2)
    assert sorted(recorder.received) == [b"one", b"two"]


# ------------------------------------------------------------------ a broken mirror never touches the primary


@pytest.mark.parametrize("how", ["stopped", "never_reads", "dies"])
async def test_a_broken_mirror_drops_its_copy_and_the_client_sees_nothing(
    nursery: trio.Nursery, how: str
) -> None:
    primary = await start_backend(nursery, echo_handler)
    target = f"127.0.0.1:{free_port()}"  # nothing listens: refused
    if how == "never_reads":
        target = (await start_backend(nursery, never_reads)).address
    elif how == "dies":
        target = (await start_backend(nursery, dies_after_a_little)).address
    payload = os.urandom(24 << 20)  # beyond the kernel's buffers and ours
    async with running_balancer(mirrored(primary.address, target)) as (balancer, address):
        with trio.fail_after(EVENTUALLY * 3):
            assert await exchange(address, payload) == payload
            assert await request(address, b"small") == b"small"
        state = mirror.state_of(balancer.pools["test"])
        await wait_until(lambda: not balancer.timer.connections)
    reason = {"stopped": "connect_failed", "never_reads": "lagging", "dies": "broken"}[how]
    assert state.dropped[reason] >= 1, state.dropped
    assert state.connections == 2
    assert balancer.pools["shadow"].servers[0].active == 0
    assert "internal_error" not in balancer.access.counts


@pytest.mark.parametrize("io", ["portable", *(["epoll"] if epoll_available() else [])])
async def test_a_never_reading_mirror_s_dropped_copy_leaves_the_connection_whole_on_the_socket_relay(
    nursery: trio.Nursery, io: str
) -> None:
    """The copy is taken from the socket relay's reads (a mirror is a tap, not a reason for the
    stream relay); once the mirror lags and its copy is dropped the relay lets the tap go and the
    client → server direction may splice again (epoll). Every byte arrives in order, and the
    client's half-close reaches the server while the answer still flows back."""
    primary = await start_backend(nursery, echo_handler)
    stuck = await start_backend(nursery, never_reads)
    data = mirrored(primary.address, stuck.address)
    data["settings"] = {"io": io}
    block, sent = os.urandom(1 << 20), bytearray()
    async with running_balancer(data) as (balancer, address):
        state = mirror.state_of(balancer.pools["test"])
        async with await trio.open_tcp_stream(address.host, address.port) as stream, \
                trio.open_nursery() as both:  # fmt: skip
            relay = await relay_of(balancer)
            assert isinstance(relay, Relay) and relay.tap is not None  # mirrored on the socket relay

            async def send_past_the_drop() -> None:
                with trio.fail_after(EVENTUALLY * 3):
                    while not state.dropped["lagging"]:
                        await stream.send_all(block)
                        sent.extend(block)
                for _ in range(4):  # more after the drop: relayed without a tap
                    await stream.send_all(block)
                    sent.extend(block)
                assert relay.tap is None and relay.up is not None
                assert relay.up.splice or relay.up.pipe_in >= 0 or not balancer.poller.caps.splice
                await stream.send_eof()

            both.start_soon(send_past_the_drop)
            echoed = await receive_all(stream)
        assert echoed == sent  # the echo ends after the client's EOF reached the server: half-close
        await wait_until(lambda: not balancer.timer.connections)
    assert state.connections == 1 and state.dropped == {**dict.fromkeys(mirror.DROP_REASONS, 0), "lagging": 1}
    assert "internal_error" not in balancer.access.counts


async def dies_after_a_little(stream: trio.SocketStream) -> None:
    """A mirror that reads a little, then resets."""
    import socket
    import struct

    await stream.receive_some(1000)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.pure_python
@pytest.mark.parametrize("where", ["_write", "_say_goodbye"])
async def test_a_bug_in_the_mirror_ends_only_the_copy(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Even in its `finally` (the copy's task runs in the connections nursery, beside every
    connection): logged, counted, the socket closed and the slot given back; the primary unharmed."""

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the mirror")

    monkeypatch.setattr(mirror.MirrorFilter, where, bug)
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    with no_fd_leak():
        async with running_balancer(mirrored(primary.address, shadow.address)) as (balancer, address):
            for payload in (b"one", b"two"):
                assert await request(address, payload) == payload
            state = mirror.state_of(balancer.pools["test"])
            await wait_until(lambda: state.dropped["internal_error"] == 2)
            await wait_until(lambda: not balancer.pools["shadow"].servers[0].active)
            await wait_until(lambda: not shadow.active)
    assert "a bug in the mirror" in caplog.text and "internal_error" not in balancer.access.counts


async def test_a_mirror_known_down_leaves_the_sampled_connections_on_the_fast_path(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A health-checked mirror pool whose server is down, and an address that just refused: no copy is
    attempted (counted as no_server) and the connection keeps the socket relay."""
    monkeypatch.setattr(mirror, "MIRROR_RETRY", 3600.0)  # the refusal is remembered for the whole test
    primary = await start_backend(nursery, echo_handler)
    data = mirrored(primary.address, f"127.0.0.1:{free_port()}")
    data["pools"]["shadow"]["health"] = {"check": "tcp"}  # down after the first round, before we listen
    data["pools"]["bare"] = {"servers": [primary.address], "health": {"check": "none"},
                             "mirror": f"127.0.0.1:{free_port()}"}  # fmt: skip
    data["listeners"]["bare"] = {"bind": "127.0.0.1:0", "pool": "bare"}
    async with running_balancer(data) as (balancer, address):
        bare = balancer.listeners["bare"].bound
        assert bare is not None
        assert await request(bare, b"first") == b"first"  # tried: refused
        states = {name: mirror.state_of(balancer.pools[name]) for name in ("test", "bare")}
        await wait_until(lambda: states["bare"].dropped["connect_failed"] == 1)
        for where in (address, bare):
            async with await trio.open_tcp_stream(where.host, where.port) as stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                assert isinstance(await relay_of(balancer), Relay)
            await wait_until(lambda: not balancer.timer.connections)
    assert states["test"].dropped["no_server"] == 1 and states["test"].connections == 1
    assert states["bare"].dropped["no_server"] == 1 and states["bare"].connections == 2


async def relay_of(balancer: Balancer) -> Any:
    await wait_until(lambda: any(c.relay is not None for c in balancer.timer.connections))
    return next(c.relay for c in balancer.timer.connections if c.relay is not None)


async def test_a_mirror_pool_without_a_server_counts_no_server(nursery: trio.Nursery) -> None:
    primary = await start_backend(nursery, echo_handler)
    data = mirrored(primary.address, "127.0.0.1:9")
    data["pools"]["shadow"]["servers"][0] = {"address": "127.0.0.1:9", "weight": 0}
    async with running_balancer(data) as (balancer, address):
        assert await request(address, b"ping") == b"ping"
        state = mirror.state_of(balancer.pools["test"])
        await wait_until(lambda: state.dropped["no_server"] == 1)


@pytest.mark.slow
async def test_a_connection_that_ends_before_the_mirror_connects_leaves_nothing(
    nursery: trio.Nursery,
) -> None:
    """The mirror is a blackholed address (its connect never finishes): the primary's end cancels it."""
    from tests.helpers import blackholed_port

    primary = await start_backend(nursery, echo_handler)
    with blackholed_port() as hole:
        data = mirrored(primary.address, f"127.0.0.1:{hole}")
        async with running_balancer(data) as (balancer, address):
            assert await request(address, b"quick") == b"quick"
            state = mirror.state_of(balancer.pools["test"])
            await wait_until(lambda: not balancer.timer.connections and state.dropped["cut"] == 1)
            assert balancer.pools["shadow"].servers[0].active == 0


# ------------------------------------------------------------------ a real redis and its mirror


@asynccontextmanager
async def redis_server(paused: bool = False) -> AsyncIterator[int]:
    """A redis-server on a free port; `paused`: stopped (SIGSTOP) once it listens, so its kernel
    accepts connections and nothing ever reads them."""
    port = free_port()
    command = [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--maxclients", "1000"]  # fmt: skip
    process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL)
    try:
        (await connect_when_listening(port)).socket.close()
        if paused:
            process.send_signal(signal.SIGSTOP)
        yield port
    finally:
        if paused:
            process.send_signal(signal.SIGCONT)
        process.terminate()
        with trio.fail_after(EVENTUALLY):
            await process.wait()


def resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


async def redis_call(port: int, *words: bytes) -> bytes:
    """One command on a fresh connection: the whole answer (read until the server closes, after QUIT)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(resp(*words) + resp(b"QUIT"))
        return await receive_all(stream)


async def two_hundred_clients(address: Address) -> list[bytes]:
    """200 clients at once, each: SET its key, APPEND to a shared log, QUIT; their answers."""
    answers: list[bytes] = []

    async def client(i: int) -> None:
        key, value = b"key:%d" % i, os.urandom(random.randint(1, 3000)).hex().encode()
        async with await trio.open_tcp_stream(address.host, address.port) as stream:
            await stream.send_all(resp(b"SET", key, value) + resp(b"APPEND", b"log", b"%d," % i)
                                  + resp(b"QUIT"))  # fmt: skip
            answers.append(await receive_all(stream))

    async with trio.open_nursery() as clients:
        for i in range(200):
            clients.start_soon(client, i)
    return answers


# Exactly the primary's answers: a copy of the mirror's would double them.
ANSWER = re.compile(rb"\+OK\r\n:\d+\r\n\+OK\r\n")


@pytest.mark.slow
async def test_two_hundred_clients_leave_the_primary_and_its_mirror_with_the_same_keys(
    nursery: trio.Nursery,
) -> None:
    async with redis_server() as primary, redis_server() as shadow:
        data = mirrored(f"127.0.0.1:{primary}", f"127.0.0.1:{shadow}")
        async with running_balancer(data) as (balancer, address):
            answers = await two_hundred_clients(address)
            state = mirror.state_of(balancer.pools["test"])
            await wait_until(lambda: not balancer.timer.connections)
        assert all(ANSWER.fullmatch(a) for a in answers), [a for a in answers if not ANSWER.fullmatch(a)][:3]
        assert state.connections == 200 and not any(state.dropped.values()), state.dropped
        for port in (primary, shadow):
            await wait_until_answers(port, b"DBSIZE", b":201\r\n")
        dumps = [await redis_dump(port) for port in (primary, shadow)]
    # Concurrent clients reach the two servers in different orders: the shared log holds the same
    # entries, perhaps not in the same order; every other key is the same.
    logs = [sorted(dump.pop(b"log").split(b",")) for dump in dumps]
    assert logs[0] == logs[1] == sorted([b""] + [b"%d" % i for i in range(200)])
    assert dumps[0] == dumps[1]
    assert len(dumps[0]) == 200


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stopped", "paused"])
async def test_a_stopped_or_paused_redis_mirror_leaves_the_clients_and_the_primary_whole(
    nursery: trio.Nursery, how: str
) -> None:
    """The mirror stopped (nothing listens: refused) or paused (its kernel accepts, nothing reads):
    every client gets exactly the primary's answers and the primary holds every key."""
    async with redis_server() as primary, redis_server(paused=how == "paused") as paused:
        shadow = paused if how == "paused" else free_port()
        async with running_balancer(mirrored(f"127.0.0.1:{primary}", f"127.0.0.1:{shadow}")) as (
            balancer, address,
        ):  # fmt: skip
            answers = await two_hundred_clients(address)
            state = mirror.state_of(balancer.pools["test"])
            await wait_until(lambda: not balancer.timer.connections)
        assert len(answers) == 200 and all(ANSWER.fullmatch(a) for a in answers), answers[:3]
        await wait_until_answers(primary, b"DBSIZE", b":201\r\n")
    assert state.connections == 200 and not state.dropped["internal_error"], state.dropped
    if how == "stopped":
        assert state.dropped["connect_failed"] >= 1, state.dropped
    assert "internal_error" not in balancer.access.counts


async def wait_until_answers(port: int, command: bytes, answer: bytes) -> None:
    with trio.fail_after(EVENTUALLY):
        while not (await redis_call(port, command)).startswith(answer):
            await trio.sleep(0.02)


async def redis_dump(port: int) -> dict[bytes, bytes]:
    """Every key and its value (strings only)."""
    keys = (await redis_call(port, b"KEYS", b"*")).split(b"\r\n")
    names = [k for k in keys[2::2] if k]
    values = {}
    for name in names:
        answer = await redis_call(port, b"GET", name)
        values[name] = answer.split(b"\r\n")[1]
    return values


# ------------------------------------------------------------------ sampling


def test_ten_percent_of_two_thousand_draws_are_within_three_points() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        drawn = sum(mirror.sampled(10, rng) for _ in range(2000))
        assert 140 <= drawn <= 260, (seed, drawn)  # 10% ± 3%: beyond four standard deviations (13.4)
    assert all(mirror.sampled(100, random.Random(1)) for _ in range(100))
    assert not any(mirror.sampled(0, random.Random(1)) for _ in range(100))


async def test_a_sampled_share_is_mirrored_and_the_rest_keep_the_socket_relay(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror._draws, "rng", random.Random(7), raising=False)  # this thread's draws
    seeded = random.Random(7)
    expected = sum(mirror.sampled(10, seeded) for _ in range(300))  # what those draws give
    primary = await start_backend(nursery, echo_handler)
    recorder = Recorder()
    shadow = await start_backend(nursery, recorder.handler)
    relays: dict[int, tuple[type, bool]] = {}  # accept order → the relay it got, and whether it copied
    data = mirrored(primary.address, shadow.address, mirror_percent=10)
    async with running_balancer(data) as (balancer, address):
        for _ in range(300):
            async with await trio.open_tcp_stream(address.host, address.port) as stream:
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                for c in balancer.timer.connections:  # as first seen: an ended relay lets its tap go
                    if c.relay is not None and c.seq not in relays:
                        relays[c.seq] = (type(c.relay), getattr(c.relay, "tap", None) is not None)
        state = mirror.state_of(balancer.pools["test"])
        await wait_until(lambda: recorder.connections == state.connections)
    assert state.connections == expected and 12 <= expected <= 48, expected  # 30 ± 18 for this seed
    assert len(relays) == 300
    assert list(relays.values()).count((Relay, False)) == 300 - state.connections  # the rest: no copy
    assert list(relays.values()).count((Relay, True)) == state.connections  # the copies: a tap each


# ------------------------------------------------------------------ reload, summary, operator views


async def test_a_reload_moves_new_connections_to_the_new_mirror_and_open_ones_keep_theirs(
    nursery: trio.Nursery,
) -> None:
    primary = await start_backend(nursery, echo_handler)
    old, new = Recorder(), Recorder()
    old_shadow = await start_backend(nursery, old.handler)
    new_shadow = await start_backend(nursery, new.handler)
    data = mirrored(primary.address, old_shadow.address)
    async with running_balancer(data) as (balancer, address):
        stream = await trio.open_tcp_stream(address.host, address.port)
        await stream.send_all(b"before ")
        assert await stream.receive_some(7) == b"before "
        data["pools"]["test"]["mirror"] = f"127.0.0.1:{new_shadow.port}"
        await balancer.apply_config(parse_config(data))
        await stream.send_all(b"after")
        await stream.send_eof()
        assert await receive_all(stream) == b"after"
        await stream.aclose()
        assert await request(address, b"new") == b"new"
        await wait_until(lambda: len(old.received) == 1 and len(new.received) == 1)
    assert old.received == [b"before after"] and new.received == [b"new"]


async def test_stats_metrics_and_the_summary_show_the_mirror(nursery: trio.Nursery) -> None:
    from trioanubis.ops.metrics import prometheus, stats

    primary = await start_backend(nursery, echo_handler)
    data = mirrored(primary.address, f"127.0.0.1:{free_port()}", mirror_percent=100)
    async with running_balancer(data) as (balancer, address):
        assert await request(address, b"ping") == b"ping"
        state = mirror.state_of(balancer.pools["test"])
        await wait_until(lambda: state.dropped["connect_failed"] == 1)
        shown = stats(balancer)["pools"][0]["mirror"]
        text = prometheus(balancer)
    assert shown == {"to": "shadow", "percent": 100, "connections": 1, "bytes": 0,
                     "dropped": {"connect_failed": 1}}  # fmt: skip
    assert 'anubis_mirror_connections_total{pool="test"} 1' in text
    assert 'anubis_mirror_dropped_total{pool="test",reason="connect_failed"} 1' in text
    assert 'anubis_mirror_dropped_total{pool="test",reason="lagging"} 0' in text
    assert 'anubis_mirror_connections_total{pool="shadow"}' not in text  # it mirrors nothing
    summary = describe(parse_config(data))
    assert "  mirror: 100% of connections copied to pool shadow (its answers discarded)" in summary
    data["pools"]["test"]["mirror"], data["pools"]["test"]["mirror_percent"] = "10.0.0.5:6379", 12.5
    assert "  mirror: 12.5% of connections copied to 10.0.0.5:6379" in describe(parse_config(data))


# ------------------------------------------------------------------ hostile config values

MIRROR_VALUES = st.one_of(
    st.sampled_from(["shadow", "test", "missing", "", " ", "127.0.0.1:1", "localhost:1", "[::1]:1", "[::1]",
                     "127.0.0.1:0", "127.0.0.1:65536", "host:port", ":1", "a" * 300 + ":1", "shadow:1",
                     "tls", "127.0.0.1:99999999999999999999", "\x00:1", "é.example:1"]),
    st.text(max_size=20), st.integers(), st.floats(), st.booleans(), st.lists(st.text(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)  # fmt: skip
PERCENT_VALUES = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
    st.sampled_from([0, 100, 100.0001, -0.0, 10, 0.001, "10", "10%", True]),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=MIRROR_VALUES, percent=PERCENT_VALUES)
def test_a_hostile_mirror_is_refused_on_one_line_or_runs_and_reloads(target: Any, percent: Any) -> None:
    data = config_for(["127.0.0.1:9"], mirror=target)
    if percent is not None:
        data["pools"]["test"]["mirror_percent"] = percent
    data["pools"]["shadow"] = {"servers": ["127.0.0.1:9"], "health": {"check": "none"}}
    data["pools"]["tls"] = {"servers": ["127.0.0.1:9"], "health": {"check": "none"}, "tls": {"verify": False}}
    try:
        config = parse_config(data, "hostile.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("hostile.toml: pools.test.mirror") and "\n" not in message, message
        assert len(message) < 600, message
        return
    pool = config.pools["test"]
    assert 0 <= pool.mirror_percent <= 100 and pool.mirror and pool.mirror != "test"
    assert (pool.mirror_address is None) == (pool.mirror in config.pools)
    trio.run(serve_and_reload, data)


async def serve_and_reload(data: dict[str, Any]) -> None:
    """Run `data` (its servers replaced by an echo), relay, reload away and back, relay again."""
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        for name in ("test", "shadow"):
            data["pools"][name]["servers"] = [backend.address]
        config = parse_config(data, "hostile.toml")
        plain = parse_config(config_for([backend.address]), "plain.toml")
        balancer = Balancer(config)
        with trio.fail_after(EVENTUALLY):
            address = next(iter((await nursery.start(balancer.run)).values()))
            payload = os.urandom(100_000)
            assert await request(address, payload) == payload
            for again in (plain, config):
                await balancer.apply_config(again)
            assert await request(address, payload) == payload
            await wait_until(lambda: not balancer.timer.connections)
        assert "internal_error" not in balancer.access.counts
        nursery.cancel_scope.cancel()


