"""The client's bytes read before connecting (proxy/connection.py's `read_early`), over real sockets.

A PROXY listener makes the timing certain: the header stage consumes exactly the header, so bytes
sent in the same write as the header are in the kernel when the early read runs.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect,
    echo_handler,
    free_port,
    receive_all,
    running_balancer,
    start_backend,
    wait_until,
)
from trioanubis.proxy import connect as connect_module
from trioanubis.proxy import connection as connection_module
from trioanubis.proxy.connect import client_gone
from trioanubis.proxy.connection import EARLY_READ
from trioanubis.proxy.io import sockcalls

HEADER = b"PROXY TCP4 10.1.1.1 10.0.0.2 1111 80\r\n"
PROXY_LISTENER = {"accept_proxy": True, "proxy_trusted": ["127.0.0.0/8"]}
# More than one early read takes: the rest comes through the relay, after it.
PAYLOAD = os.urandom(EARLY_READ * 2 + 123)
TAIL = b"and the rest, after the first answer"


def early_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many bytes each connection read before connecting (0: none were there)."""
    taken: list[int] = []
    read_early: Callable[[Any], bool] = connection_module.read_early

    def counted(conn: Any) -> bool:
        result = read_early(conn)
        taken.append(len(conn.early))
        return result

    monkeypatch.setattr(connection_module, "read_early", counted)
    return taken


def delayed_acks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The `delay_ack` each data-path socket was connected with."""
    asked: list[bool] = []
    connect_tcp = sockcalls.connect_tcp

    def recorded(sock: socket.socket, fd: int, sockaddr: tuple[object, ...], delay_ack: bool, at_once: bool
                 ) -> int:
        asked.append(delay_ack)
        return connect_tcp(sock, fd, sockaddr, delay_ack, at_once)

    monkeypatch.setattr(connect_module, "_connect_inet", recorded)
    monkeypatch.setattr(connect_module, "_connect_tcp", recorded)
    return asked


async def exchange_with_early_bytes(address: Any) -> bytes:
    """Send the header and PAYLOAD in one write, read the echo of PAYLOAD, then send TAIL and EOF."""
    stream = await connect(address)
    async with stream:
        await stream.send_all(HEADER + PAYLOAD)
        echoed = bytearray()
        with trio.fail_after(EVENTUALLY):
            while len(echoed) < len(PAYLOAD):
                echoed += await stream.receive_some(65536)
        await stream.send_all(TAIL)
        await stream.send_eof()
        return bytes(echoed) + await receive_all(stream)


@pytest.mark.pure_python  # patches module functions, which the compiled modules call natively
@pytest.mark.parametrize("speaks_first", ["client", "server"])
async def test_a_connect_delays_its_ack_only_with_the_client_s_bytes_in_hand(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, speaks_first: str
) -> None:
    """With bytes read early, the handshake's last ACK waits for them; with none, it goes at once,
    so a server that speaks first (SMTP, MySQL) accepts and greets without waiting for a client
    that waits for it."""
    taken, asked = early_reads(monkeypatch), delayed_acks(monkeypatch)
    if speaks_first == "client":
        backend = await start_backend(nursery, echo_handler)
        async with running_balancer(config_for([backend.address], listener=PROXY_LISTENER)) as (_, address):
            assert await exchange_with_early_bytes(address) == PAYLOAD + TAIL
        assert (taken, asked) == ([EARLY_READ], [True])
        return

    async def greet(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 ready\r\n")
        await echo_handler(stream)

    backend = await start_backend(nursery, greet)
    async with running_balancer(config_for([backend.address])) as (_, address):
        stream = await connect(address)
        async with stream:
            with trio.fail_after(EVENTUALLY):
                assert await stream.receive_some(100) == b"220 ready\r\n"
            await stream.send_all(b"HELO")
            assert await stream.receive_some(100) == b"HELO"
    assert (taken, asked) == ([0], [False])


@pytest.mark.parametrize("shape", ["socket relay", "stream relay"])
async def test_bytes_read_before_connecting_go_first_in_order_and_are_counted(
    nursery: trio.Nursery, shape: str
) -> None:
    """The early chunk is the relay's first: the server gets every byte in order, the pool counts
    them; through a filter (a bandwidth limit that never binds: the stream relay) as well."""
    backend = await start_backend(nursery, echo_handler)
    pool: dict[str, Any] = {"upload_rate": "1024GiB/s"} if shape == "stream relay" else {}
    data = config_for([backend.address], listener=PROXY_LISTENER, **pool)
    async with running_balancer(data) as (balancer, address):
        assert await exchange_with_early_bytes(address) == PAYLOAD + TAIL
        server = balancer.pools["test"].servers[0]
        await wait_until(lambda: server.total == 1 and not server.active)
    assert (server.bytes_in, server.bytes_out) == (len(PAYLOAD + TAIL), len(PAYLOAD + TAIL))


async def test_a_mirror_gets_the_bytes_read_before_connecting(nursery: trio.Nursery) -> None:
    copies: list[bytes] = []

    async def keep(stream: trio.SocketStream) -> None:
        copies.append(await receive_all(stream))

    primary = await start_backend(nursery, echo_handler)
    shadow = await start_backend(nursery, keep)
    data = config_for([primary.address], listener=PROXY_LISTENER, mirror="shadow")
    data["pools"]["shadow"] = {"servers": [shadow.address], "health": {"check": "none"}}
    async with running_balancer(data) as (_, address):
        assert await exchange_with_early_bytes(address) == PAYLOAD + TAIL
        await wait_until(lambda: bool(copies))
    assert copies == [PAYLOAD + TAIL]


async def test_a_client_that_resets_before_connecting_ends_reset_and_no_server_is_asked(
    nursery: trio.Nursery,
) -> None:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address], listener=PROXY_LISTENER)
    async with running_balancer(data) as (balancer, address):
        sock = socket.create_connection((address.host, address.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(HEADER)
        sock.close()  # a reset, behind the header
        await wait_until(lambda: sum(balancer.access.counts.values()) == 1)
        # A read after the reset would find a plain EOF: the early read saw the reset and ended it.
        assert balancer.access.counts == {"client_reset": 1}
    assert backend.connections == 0


@pytest.mark.parametrize("pool", [{}, {"queue_timeout": "200ms"}], ids=["connect_failed", "queue_timeout"])
async def test_a_client_whose_bytes_were_read_early_and_never_relayed_is_reset(pool: dict[str, Any]) -> None:
    """Closing a socket with unread bytes resets it; read early, they are no longer unread, so the
    connection resets itself: a client that reads to EOF never takes the close for an answer."""
    data = config_for([f"127.0.0.1:{free_port()}"], listener=PROXY_LISTENER, **pool)
    async with running_balancer(data) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(HEADER + b"GET / HTTP/1.0\r\n\r\n")
            with trio.fail_after(EVENTUALLY), pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(100)
        assert sum(balancer.access.counts.values()) == 1


def half_open_to(port: int) -> int:
    """Connections to 127.0.0.1:`port` whose handshake waits for its last ACK (SYN_RECV, Linux)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == f"0100007F:{port:04X}" and row[3] == "03")


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
@pytest.mark.parametrize("fault", [{"latency": "60s"}, {"blackhole": True}], ids=["latency", "blackhole"])
async def test_a_fault_that_holds_the_early_bytes_back_does_not_hold_back_the_connect_s_ack(
    nursery: trio.Nursery, fault: dict[str, Any]
) -> None:
    """Without the early bytes going at once, the ACK the connect delayed for them goes by itself:
    the server accepts now, not at the delayed-ACK limit (a fault delays data, not the connect)."""
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address], listener=PROXY_LISTENER, faults={**fault, "direction": "upstream"})
    async with running_balancer(data) as (balancer, address):
        stream = await connect(address)
        async with stream:
            await stream.send_all(HEADER + b"held back")
            await wait_until(lambda: any(conn.relay is not None for conn in balancer.timer.connections))
            # The relay started: the ACK went with it (else at the delayed-ACK limit, 200 ms on).
            assert half_open_to(backend.port) == 0
            await wait_until(lambda: backend.connections == 1)


@pytest.mark.parametrize("fin_after_data", [False, True])
def test_a_client_whose_bytes_were_read_early_and_that_half_closed_is_not_taken_for_gone(
    fin_after_data: bool,
) -> None:
    """Its FIN is the first thing left to peek at, but bytes came before it: a client that
    half-closed and waits for the answer (gone only where FIN after data counts as gone, held)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)
            accepted.settimeout(EVENTUALLY)
            assert accepted.recv(100) == b"request"  # what read_early does
            accepted.setblocking(False)
            assert client_gone(accepted, fin_after_data=fin_after_data, read_early=True) is fin_after_data
            assert client_gone(accepted, fin_after_data=fin_after_data)  # with nothing read: a bare FIN
