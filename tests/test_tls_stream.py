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
