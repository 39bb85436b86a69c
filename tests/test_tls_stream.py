"""TlsStream against Trio's own conformance suite for half-closeable streams, TLS 1.2 and 1.3."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.tlscerts import Authority
from trioanubis.tls.context import client_context, server_context
from trioanubis.tls.stream import TlsError, TlsStream


@pytest.mark.slow
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_stream_is_a_conforming_half_closeable_stream(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ca = Authority(tmp_path)
    pair = ca.issue("a.test")
    server = server_context([(pair.cert, pair.key)])
    server.maximum_version = version
    client = client_context(verify=True, ca=ca.pair.cert, cert="", key="")

    async def make() -> tuple[TlsStream, TlsStream]:
        left, right = trio.testing.memory_stream_pair()
        ours = TlsStream(left, server, server_side=True)
        theirs = TlsStream(right, client, server_side=False, server_hostname="a.test")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.do_handshake)
            nursery.start_soon(theirs.do_handshake)
        return ours, theirs

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(make, None)


@pytest.mark.slow
async def test_a_failed_handshake_names_the_reason(tmp_path: Path) -> None:
    ca, other = Authority(tmp_path), Authority(tmp_path, "other")
    pair = other.issue("a.test")
    left, right = trio.testing.memory_stream_pair()
    ours = TlsStream(left, server_context([(pair.cert, pair.key)]), server_side=True)
    theirs = TlsStream(right, client_context(verify=True, ca=ca.pair.cert, cert="", key=""),
                       server_side=False, server_hostname="a.test")  # fmt: skip
    reasons: list[str] = []

    async def handshake(stream: TlsStream) -> None:
        try:
            await stream.do_handshake()
        except TlsError as exc:
            reasons.append(exc.reason)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, ours)
            nursery.start_soon(handshake, theirs)
    assert "certificate verify failed: unable to get local issuer certificate" in reasons


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
async def test_receiving_never_waits_for_the_other_tasks_send(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Full duplex where every send waits for the peer to read (a lockstep transport).

    A receive used to send whatever was in OpenSSL's outgoing buffer, the
    sending task's records included: with the sender blocked on a peer that
    was itself blocked the same way, neither side read again (a relay's two
    TLS ends deadlocked under load, 1 run in 8).
    """
    ca = Authority(tmp_path)
    pair = ca.issue("a.test")
    server = server_context([(pair.cert, pair.key)])
    server.maximum_version = version
    client = client_context(verify=True, ca=ca.pair.cert, cert="", key="")
    left, right = trio.testing.lockstep_stream_pair()
    ours = TlsStream(left, server, server_side=True)
    theirs = TlsStream(right, client, server_side=False, server_hostname="a.test")
    size, chunk = 1 << 18, 5000
    payload = bytes(range(256)) * (size // 256)

    async def send(stream: TlsStream) -> None:
        for start in range(0, size, chunk):
            await stream.send_all(payload[start : start + chunk])
        await stream.send_eof()

    async def receive(stream: TlsStream, into: bytearray) -> None:
        while data := await stream.receive_some(7000):
            into.extend(data)

    async def talk(stream: TlsStream, into: bytearray) -> None:
        await stream.do_handshake()  # (a TLS 1.3 server's tickets wait here until the client reads)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, stream)
            nursery.start_soon(receive, stream, into)

    got_ours, got_theirs = bytearray(), bytearray()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk, ours, got_ours)
            nursery.start_soon(talk, theirs, got_theirs)
    assert got_ours == payload and got_theirs == payload
