"""A connection's life (proxy/lifecycle.py): whatever way it ends, it gives back everything it took.

The first tests are the findings that made one owner of a connection's life
necessary, each against a real balancer on loopback; the last is the
property: connections through every kind of listener, ended at random
points, leave every counter at zero.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
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
    open_fds,
    receive_all,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import blackholed_port, connect_from, real_hello
from tests.tlscerts import Authority
from trioanubis.app import Balancer
from trioanubis.config import Address, parse_config
from trioanubis.proxy import mirror, rates
from trioanubis.proxy.connect import as_stdlib
from trioanubis.tls.stream import TlsError, TlsStream

HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


async def refused(address: Address, payload: bytes = b"", source: str = "127.0.0.1") -> bool:
    """Connect (from `source`), send `payload`: True when the balancer closes or resets without a byte."""
    stream = await connect_from(source, address)
    async with stream:
        try:
            if payload:
                await stream.send_all(payload)
            with trio.fail_after(EVENTUALLY):
                return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


async def tls_exchange(address: Address, ca: Authority, payload: bytes = b"ping") -> bytes:
    context = ssl.create_default_context(cafile=ca.pair.cert)
    raw = await connect(address)
    stream = trio.SSLStream(raw, context, server_hostname="localhost", https_compatible=True)
    async with stream:
        await stream.send_all(payload)
        answer = b""
        while len(answer) < len(payload):
            answer += await stream.receive_some(65536)
        return answer


def counters_at_rest(balancer: Balancer) -> list[str]:
    """What is still held by connections that should all have ended: [] when nothing is."""
    held = []
    if balancer.limits.active:
        held.append(f"limits.active={balancer.limits.active}")
    for name, listener in balancer.listeners.items():
        if listener.active:
            held.append(f"{name}.active={listener.active}")
        if listener.admission.clients.active:
            held.append(f"{name}.per-client={listener.admission.clients.active}")
    for name, pool in balancer.pools.items():
        for server in (*pool.servers, *pool.retired):
            if server.active:
                held.append(f"{name}.{server.name}.active={server.active}")
        budgets = rates.state_of(pool).budgets
        if budgets is not None and budgets.active:
            held.append(f"{name}.per-client-budgets={budgets.active}")
        if len(pool.held):
            held.append(f"{name}.held={len(pool.held)}")
    if balancer.timer.connections:
        held.append(f"timer={len(balancer.timer.connections)}")
    return held


# ------------------------------------------------------------ the findings


OPENINGS: dict[str, Callable[[Authority], dict[str, Any]]] = {
    # how a connection to this listener fails before it is relayed → the listener's options
    "handshake": lambda ca: {"tls": {"cert": (p := ca.issue("localhost")).cert, "key": p.key}},
    "no_route": lambda ca: {"routes": [{"sni": "known.test", "pool": "test"}], "pool": None},
    "peek_timeout": lambda ca: {"routes": [{"sni": "known.test", "pool": "test"}], "peek_timeout": "200ms"},
    "early_close": lambda ca: {"routes": [{"sni": "known.test", "pool": "test"}]},
    "proxy_header": lambda ca: {
        "accept_proxy": True,
        "proxy_trusted": ["127.0.0.0/8"],
        "routes": [{"sni": "known.test", "pool": "test"}],
    },
}


async def fail_opening(how: str, address: Address) -> None:
    """One connection whose opening fails the way `how` says, from 127.0.0.2."""
    if how == "handshake":
        assert await refused(address, HTTP_REQUEST, "127.0.0.2")
    elif how == "no_route":
        assert await refused(address, real_hello("unknown.test"), "127.0.0.2")
    elif how == "peek_timeout":
        assert await refused(address, real_hello("known.test")[:20], "127.0.0.2")
    elif how == "proxy_header":
        header = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
        assert await refused(address, header + real_hello("x")[:9], "127.0.0.2")
    else:
        stream = await connect_from("127.0.0.2", address)
        await stream.send_all(real_hello("known.test")[:20])
        await stream.aclose()  # before the hello is whole


@pytest.mark.slow
@pytest.mark.parametrize("how", list(OPENINGS))
async def test_an_opening_that_fails_gives_its_per_client_slot_back(
    nursery: trio.Nursery, ca: Authority, how: str
) -> None:
    """Finding 1: two failed openings used to lock the client's address out until a restart."""
    backend = await start_backend(nursery, echo_handler)
    listener = {"max_connections_per_client": 2, **OPENINGS[how](ca)}
    if how == "proxy_header":  # the slot is the client the header names: 10.0.0.1 here
        listener["peek_timeout"] = "200ms"
    data = config_for([backend.address], listener=listener)
    if listener.get("pool", "") is None:  # no fallback pool
        del data["listeners"]["test"]["pool"]
    async with running_balancer(data) as (balancer, address):
        admission = balancer.listeners["test"].admission
        for _ in range(4):
            await fail_opening(how, address)
        await wait_until(lambda: not counters_at_rest(balancer))
        assert admission.clients.active == {} and admission.refused["client_connections"] == 0
        if how == "handshake":  # the client still gets through
            assert await tls_exchange(address, ca) == b"ping"


async def test_a_freed_slot_wakes_the_held_client_at_once(nursery: trio.Nursery) -> None:
    """Finding 2: with no health check, a released slot woke nobody; the held client waited out its time."""
    backend = await start_backend(nursery, echo_handler)
    data = config_for([{"address": backend.address, "max_connections": 1}], queue_timeout="1h")
    async with running_balancer(data) as (balancer, address):
        first = await connect(address)
        await first.send_all(b"first")
        assert await first.receive_some(5) == b"first"
        second = await connect(address)
        await second.send_all(b"second")
        await wait_until(lambda: len(balancer.pools["test"].held) == 1)
        await first.aclose()
        with trio.fail_after(EVENTUALLY):  # far below queue_timeout: the release woke it
            got = b""
            while len(got) < 6:
                got += await second.receive_some(6)
        assert got == b"second"
        await second.aclose()


def connect_in_a_burst(address: Address, count: int) -> list[socket.socket]:
    """`count` clients connected in one go, in order, each sending its number: they queue in the backlog."""
    clients = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((address.host, address.port))
        clients.append(sock)
    for i, sock in enumerate(clients):
        while True:
            try:
                sock.send(b"%05d" % i)
                break
            except BlockingIOError:  # the handshake is not done yet: loopback finishes it at once
                pass
    return clients


async def test_held_clients_are_served_in_accept_order_and_a_full_line_refuses_the_newest(
    nursery: trio.Nursery,
) -> None:
    """Finding 3: a line in the order tasks reached it, and a full line that refused older clients."""
    port = free_port()
    health = {"check": "tcp", "interval": "200ms", "timeout": "100ms", "rise": 1, "fall": 1}
    data = config_for([f"127.0.0.1:{port}"], health=health, queue_timeout="1h", max_queued=40)
    served: list[int] = []

    async def record(stream: trio.SocketStream) -> None:
        got = b""
        while len(got) < 5:
            got += await stream.receive_some(5 - len(got))
        served.append(int(got))
        await stream.send_all(b"ok")
        await stream.aclose()

    async with running_balancer(data) as (balancer, address):
        clients = connect_in_a_burst(address, 60)
        try:
            pool = balancer.pools["test"]
            await wait_until(lambda: len(pool.held) == 40 and pool.held.full == 20)
            await start_backend(nursery, record, port=port)
            await wait_until(lambda: len(served) == 40)
            assert served == list(range(40))  # the 40 accepted first, in accept order
            await wait_until(lambda: balancer.access.counts.get("queue_full") == 20)
        finally:
            for sock in clients:
                sock.close()


async def test_an_ipv4_client_and_its_ipv4_mapped_form_are_one_client(nursery: trio.Nursery) -> None:
    """Finding 5: `PROXY TCP6 ::ffff:10.1.1.1` was a second client beside `PROXY TCP4 10.1.1.1`."""
    backend = await start_backend(nursery, echo_handler)
    listener = {"accept_proxy": True, "proxy_trusted": ["127.0.0.0/8"], "max_connections_per_client": 1}
    async with running_balancer(config_for([backend.address], listener=listener)) as (balancer, address):
        first = await connect(address)
        await first.send_all(b"PROXY TCP4 10.1.1.1 10.0.0.2 1111 80\r\nping")
        assert await first.receive_some(4) == b"ping"
        assert await refused(address, b"PROXY TCP6 ::ffff:10.1.1.1 ::ffff:10.0.0.2 1112 80\r\nping")
        assert balancer.listeners["test"].admission.clients.active == {"10.1.1.1": 1}
        await first.aclose()
        await wait_until(lambda: balancer.access.counts.get("client_eof") == 1)
        assert balancer.listeners["test"].admission.refused["client_connections"] == 1


@pytest.mark.slow
async def test_held_clients_that_sent_bytes_and_closed_leave_the_line(nursery: trio.Nursery) -> None:
    """Finding 6: the 'has it gone' peek saw their unread bytes, and they kept their places."""
    data = config_for([f"127.0.0.1:{free_port()}"], queue_timeout="1h")
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        clients = [await connect(address) for _ in range(20)]
        for client in clients:
            await client.send_all(b"a request")
        await wait_until(lambda: len(pool.held) == 20)
        for client in clients:
            await client.aclose()
        await wait_until(lambda: len(pool.held) == 0)  # within a GONE_CHECK, not at queue_timeout
        assert balancer.access.counts == {"client_abort": 20}


async def test_without_abort_on_close_a_half_closed_held_client_is_served(nursery: trio.Nursery) -> None:
    port = free_port()
    health = {"check": "tcp", "interval": "200ms", "timeout": "100ms", "rise": 1, "fall": 1}
    data = config_for([f"127.0.0.1:{port}"], health=health, queue_timeout="1h", abort_on_close=False)
    async with running_balancer(data) as (balancer, address):
        client = await connect(address)
        await client.send_all(b"question")
        await client.send_eof()  # it waits for the answer all the same
        await wait_until(lambda: len(balancer.pools["test"].held) == 1)
        await start_backend(nursery, echo_handler, port=port)
        assert await receive_all(client) == b"question"
        await client.aclose()


# ------------------------------------------------------------- faults through TLS


def tls_listener(ca: Authority) -> dict[str, Any]:
    pair = ca.issue("localhost")
    return {"tls": {"cert": pair.cert, "key": pair.key}}


async def test_faults_cut_a_tls_terminated_connection_after_exactly_that_many_bytes(
    nursery: trio.Nursery, ca: Authority
) -> None:
    """Finding 4: faults did not apply through TLS termination."""

    async def talker(stream: trio.SocketStream) -> None:
        with trio.move_on_after(EVENTUALLY), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"y" * 1_000_000)  # reset by the fault, on purpose

    backend = await start_backend(nursery, talker)
    faults = {"reset_after": "64KiB", "latency": "1ms"}
    data = config_for([backend.address], listener=tls_listener(ca), faults=faults)
    async with running_balancer(data) as (balancer, address):
        context = ssl.create_default_context(cafile=ca.pair.cert)
        stream = trio.SSLStream(await connect(address), context, server_hostname="localhost")
        received = 0
        with pytest.raises(trio.BrokenResourceError):
            async with stream:
                while data_ := await stream.receive_some(65536):
                    received += len(data_)
        assert received == 65536  # plaintext bytes, then the reset
        server = balancer.pools["test"].servers[0]
        await wait_until(lambda: balancer.access.counts.get("fault_reset") == 1)
        assert server.faults_applied == {"latency": 1, "reset_after": 1}


@pytest.mark.slow
@pytest.mark.parametrize(
    "faults", [{"latency": "2ms", "jitter": "1ms"}, {"slice": "61B"}], ids=["latency", "slice"]
)
async def test_faulted_tls_streams_pass_trios_half_closeable_stream_checks(
    nursery: trio.Nursery, ca: Authority, faults: dict[str, str]
) -> None:
    """trio.testing's conformance suite on (TLS client, backend) pairs: termination, then the faults."""
    accepted: list[trio.SocketStream] = []
    arrived = trio.lowlevel.ParkingLot()

    async def hand_over(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        arrived.unpark_all()
        await trio.sleep_forever()

    backend = await start_backend(nursery, hand_over)
    data = config_for([backend.address], listener=tls_listener(ca), faults=faults)
    async with running_balancer(data) as (balancer, address):
        context = ssl.create_default_context(cafile=ca.pair.cert)
        # TLS 1.2: a TLS 1.3 server's session tickets come after the handshake, and the suite's
        # client closes without reading them, which the kernel answers with a reset.
        context.maximum_version = ssl.TLSVersion.TLSv1_2

        async def stream_pair() -> tuple[trio.abc.HalfCloseableStream, trio.SocketStream]:
            client = TlsStream(await connect(address), context, server_side=False,
                               server_hostname="localhost")  # fmt: skip
            await client.do_handshake()
            while not accepted:
                await arrived.park()
            return client, accepted.pop()

        await trio.testing.check_half_closeable_stream(stream_pair, None)
        assert set(balancer.pools["test"].servers[0].faults_applied) == set(faults)


# ------------------------------------------------------------- the property

# Every kind of listener (the listener's options → the pool it sends to).
SHORT = "300ms"
KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "plain": ({"max_connections_per_client": 3}, "echo"),
    "proxy": (
        {"accept_proxy": True, "proxy_trusted": ["127.0.0.0/8"], "max_connections_per_client": 2,
         "proxy_timeout": SHORT},
        "echo",
    ),
    "tls": ({"max_connections_per_client": 3, "peek_timeout": SHORT}, "echo"),
    "sni": ({"routes": [{"sni": "known.test", "pool": "echo"}], "peek_timeout": SHORT}, ""),
    "queue": ({}, "one"),  # one server taking one connection at a time; the rest wait in line
    "dead": ({}, "dead"),  # nothing listens: held, then queue_timeout
    "faulty": ({"max_connections": 3}, "faulty"),
    "tls_faulty": ({"peek_timeout": SHORT}, "faulty"),  # faults through TLS termination
    "slow": ({}, "hole"),  # connects never finish: connect_timeout
    "refusing": ({}, "refused"),  # connect_failed
    "flaky": ({}, "flaky"),  # the server answers a little, then resets
    "mirrored": ({"max_connections_per_client": 3}, "mirrored"),  # copied to a mirror that may die
    "tls_mirrored": ({"peek_timeout": SHORT}, "mirrored"),  # the copy of a TLS-terminated connection
    "limited": ({"download_rate": "6KB/s"}, "limited"),  # per connection and per client: they wait
}
ENDINGS = ("complete", "close_early", "reset_early", "reset_mid", "bad_opening", "stall")
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PROXIED = ("10.9.0.1", "::ffff:10.9.0.1", "10.9.0.2")  # the first two are one client


def property_config(ca: Authority, echo: str, flaky: str, hole: int) -> dict[str, Any]:
    pair = ca.issue("localhost")
    tls = {"cert": pair.cert, "key": pair.key}
    timeouts = {"idle_timeout": "500ms", "half_close_timeout": "500ms", "health": {"check": "none"}}
    pools = {
        "echo": {"servers": [echo]},
        "one": {"servers": [{"address": echo, "max_connections": 1}], "queue_timeout": "1s"},
        "dead": {"servers": [f"127.0.0.1:{free_port()}"], "queue_timeout": SHORT, "eject_after": 0},
        "faulty": {"servers": [echo], "faults": {"latency": "5ms", "slice": "700B"}},
        "hole": {"servers": [f"127.0.0.1:{hole}"], "connect_timeout": SHORT, "retries": 0},
        "refused": {"servers": [f"127.0.0.1:{free_port()}"], "retries": 0, "eject_after": 0},
        "flaky": {"servers": [flaky]},
        # The mirror pool: a healthy mirror and one that reads a little and resets, in turn.
        "mirrored": {"servers": [echo], "mirror": "shadow"},
        "shadow": {"servers": [echo, flaky]},
        "limited": {"servers": [echo], "upload_rate": "8KB/s", "upload_rate_per_client": "5KB/s",
                    "download_rate_per_client": "4KB/s"},
    }
    listeners = {}
    for kind, (options, pool) in KINDS.items():
        listener: dict[str, Any] = {"bind": "127.0.0.1:0", **options}
        if pool:
            listener["pool"] = pool
        if kind.startswith("tls"):
            listener["tls"] = tls
        listeners[kind] = listener
    return {
        "settings": {"drain_timeout": SHORT},
        "listeners": listeners,
        "pools": {name: {**timeouts, **pool} for name, pool in pools.items()},
    }


async def flaky_handler(stream: trio.SocketStream) -> None:
    """A server that answers a little, then resets."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.receive_some(100)
        await stream.send_all(b"partial")
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


class Client:
    """One client of the property test: connect to a listener of `kind`, end the way `ending` says."""

    def __init__(self, ca: Authority, address: Address, kind: str, ending: str, source: int) -> None:
        self.ca, self.address, self.kind, self.ending = ca, address, kind, ending
        self.source = SOURCES[source % len(SOURCES)]
        self.proxied = PROXIED[source % len(PROXIED)]

    async def run(self, progress: list[int]) -> None:
        """Act, then wait until the balancer ends the connection; every error is a way to end."""
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(EVENTUALLY):
                stream = await connect_from(self.source, self.address)
                progress.append(1)
                await self._act(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError, TlsError):
            pass
        finally:
            if stream is not None:
                stream.socket.close()

    async def _act(self, raw: trio.SocketStream) -> None:
        ending = self.ending
        if ending == "close_early":
            return
        if ending == "reset_early":
            await raw.send_all(b"abc")
            abort(raw)
            return
        if ending == "bad_opening":
            await raw.send_all(self._bad_opening())
            await drain_until_closed(raw)
            return
        stream = await self._open(raw)
        if ending == "stall":
            await drain_until_closed(stream)
            return
        await stream.send_all(b"x" * 3000)
        if ending == "reset_mid":
            with trio.move_on_after(0.05):  # a moment to let some bytes through; any amount will do
                await stream.receive_some(100)
            abort(raw)
            return
        with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError):
            await stream.send_eof()
        await drain_until_closed(stream)

    async def _open(self, raw: trio.SocketStream) -> trio.abc.HalfCloseableStream:
        if self.kind == "proxy":
            family = "TCP6" if ":" in self.proxied else "TCP4"
            local = "::ffff:10.0.0.9" if family == "TCP6" else "10.0.0.9"
            await raw.send_all(f"PROXY {family} {self.proxied} {local} 1234 80\r\n".encode())
        if self.kind == "sni":
            await raw.send_all(real_hello("known.test"))  # echoed back by the server, unread
        if self.kind.startswith("tls"):
            context = ssl.create_default_context(cafile=self.ca.pair.cert)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            stream = TlsStream(raw, context, server_side=False, server_hostname="localhost")
            await stream.do_handshake()
            return stream
        return raw

    def _bad_opening(self) -> bytes:
        if self.kind == "proxy":
            return b"PROXY TCP9 nonsense\r\n"
        if self.kind == "sni":
            return real_hello("unknown.test")  # no route, no fallback
        if self.kind.startswith("tls"):
            return HTTP_REQUEST  # not TLS: the handshake fails
        return b"\x16\x03\x01\x00\x05hello"  # anything, to a listener that reads nothing first


def abort(stream: trio.SocketStream) -> None:
    """Close with a reset."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def drain_until_closed(stream: trio.abc.ReceiveStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        while await stream.receive_some(65536):
            pass


ONE_CLIENT = st.tuples(st.sampled_from(list(KINDS)), st.sampled_from(ENDINGS), st.integers(0, 5))


@pytest.mark.slow
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    plan=st.lists(ONE_CLIENT, min_size=1, max_size=14),
    stop=st.sampled_from(["settle", "drain", "cancel"]),
    cut=st.integers(0, 14),
)
async def test_every_way_a_connection_ends_gives_back_everything_it_took(
    ca: Authority, plan: list[tuple[str, str, int]], stop: str, cut: int
) -> None:
    """Connections through every kind of listener, ended at random points (by the client, a timeout,
    a refusal, a server, a drain or a cancellation), leave every counter and descriptor as it was."""
    before = open_fds()
    async with trio.open_nursery() as outer:
        echo = await start_backend(outer, echo_handler)
        flaky = await start_backend(outer, flaky_handler)
        with blackholed_port() as hole:
            balancer = Balancer(parse_config(property_config(ca, echo.address, flaky.address, hole)))
            scope = trio.CancelScope()

            async def run_balancer(task_status: trio.TaskStatus[dict[str, Address]]) -> None:
                with scope:
                    await balancer.run(task_status=task_status)

            bound = await outer.start(run_balancer)
            progress: list[int] = []
            async with trio.open_nursery() as clients:
                for kind, ending, source in plan:
                    clients.start_soon(Client(ca, bound[kind], kind, ending, source).run, progress)
                if stop != "settle":
                    await wait_until(lambda: len(progress) >= min(cut, len(plan)))
                    balancer.shutdown() if stop == "drain" else scope.cancel()
            if stop == "settle":
                await wait_until(lambda: not counters_at_rest(balancer))
                assert await Client(ca, bound["plain"], "plain", "complete", 0).run([]) is None
                balancer.shutdown()
            with trio.fail_after(EVENTUALLY):
                await balancer.stopped.wait()
            assert counters_at_rest(balancer) == []
            assert "internal_error" not in balancer.access.counts, balancer.access.counts
            assert not mirror.state_of(balancer.pools["mirrored"]).dropped["internal_error"]
        outer.cancel_scope.cancel()
    await wait_until(lambda: open_fds() <= before)


async def test_a_data_path_socket_becomes_the_stdlib_type_trio_takes_with_its_connection() -> None:
    """The data path's sockets are the C type (`_socket.socket`); a connection that goes to Trio's
    streams (TLS, filters) turns each into the stdlib type, the same connection, the old object
    detached so that closing it closes nothing."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        raw = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.connect(listening.getsockname())
        accepted, _ = listening.accept()
        with accepted:
            fd = raw.fileno()
            converted = as_stdlib(raw)
            assert type(converted) is socket.socket and converted.fileno() == fd
            assert raw.fileno() == -1
            raw.close()  # detached: the connection stays open
            assert as_stdlib(converted) is converted
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(converted))
            async with stream:
                await stream.send_all(b"through Trio")
                assert accepted.recv(100) == b"through Trio"
