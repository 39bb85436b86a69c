"""The PROXY protocol reader and builders, without sockets: vectors from the spec and Hypothesis."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioanubis.proxy.proxy_protocol import (
    MAX_BUFFERED,
    V1_MAX,
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeader,
    build_header,
    build_local,
)

PAYLOAD = b"GET / HTTP/1.1\r\n\r\n"


def read(data: bytes) -> tuple[HeaderReader, int]:
    reader = HeaderReader()
    return reader, reader.feed(data)


def v2(command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, size) + body


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("!BH", kind, len(value) if length is None else length) + value


TCP4_BODY = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack("!HH", 51234, 443)


# ------------------------------------------------------------------ vectors


@pytest.mark.slow
@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n", ("192.0.2.7", 51234), ("10.0.0.1", 443)),
        (b"PROXY TCP6 2001:db8::0:7 ::1 1 65535\r\n", ("2001:db8::7", 1), ("::1", 65535)),
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
         ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        (b"PROXY UNKNOWN\r\n", None, None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None, None),
    ],
)  # fmt: skip
def test_v1_headers_are_read_and_the_payload_is_left(
    line: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    reader, taken = read(line + PAYLOAD)
    assert reader.done and taken == len(line)
    assert reader.header == ProxyHeader(1, source, destination)


@pytest.mark.slow
@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\n",  # LF without CR
        b"PROXY TCP4 192.0.2.7  10.0.0.1 51234 443\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n",  # a port missing
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 65536\r\n",  # port out of range
        b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 443\r\n",
        b"PROXY TCP4 ::1 10.0.0.1 1 443\r\n",  # IPv6 under TCP4
        b"PROXY TCP6 192.0.2.7 ::1 1 443\r\n",  # IPv4 under TCP6
        b"PROXY TCP6 fe80::1%eth0 ::1 1 443\r\n",  # a zone is not an address on the wire
        b"PROXY TCP4 192.0.2.300 10.0.0.1 1 443\r\n",
        b"PROXY UDP4 192.0.2.7 10.0.0.1 1 443\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 \xb9 443\r\n",  # not ASCII
        b"PROXY TCP4 192.0.2.7 10.0.0.1 \xd9\xa1 443\r\n",  # a non-ASCII digit
        b"PROXY \r\n",
    ],
)
def test_bad_v1_headers_fail(line: bytes) -> None:
    reader, _ = read(line + PAYLOAD)
    assert reader.failed and reader.header is None and reader.error


def test_a_v1_line_without_crlf_fails_at_107_bytes_without_buffering_more() -> None:
    reader, taken = read(b"PROXY TCP4 " + b"1" * 200)
    assert reader.failed and "107" in reader.error
    assert taken == V1_MAX and reader.buffered == 0


def test_garbage_fails_at_the_first_byte() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXX", b"\r\n\r\n\x00\r\nQUIX\n"):
        reader, taken = read(data)
        assert reader.failed, data
        assert taken <= len(V2_SIGNATURE)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (v2(1, 0x11, TCP4_BODY), ProxyHeader(2, ("192.0.2.7", 51234), ("10.0.0.1", 443))),
        (v2(1, 0x21, ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
            + struct.pack("!HH", 1, 2)), ProxyHeader(2, ("2001:db8::7", 1), ("::1", 2))),
        # LOCAL: addresses ignored, whatever the family says
        (v2(0, 0x11, TCP4_BODY), ProxyHeader(2, None, None)),
        (v2(0, 0x00, b""), ProxyHeader(2, None, None)),
        # PROXY with AF_UNSPEC, AF_UNIX, or UDP: no TCP client for us
        (v2(1, 0x00, b"ignored"), ProxyHeader(2, None, None)),
        (v2(1, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")), ProxyHeader(2, None, None)),
        (v2(1, 0x12, TCP4_BODY), ProxyHeader(2, None, None)),
        # TLVs are skipped (ALPN, authority, a NOOP with an empty value, a custom one)
        (v2(1, 0x11, TCP4_BODY + tlv(1, b"h2") + tlv(2, b"example.com") + tlv(4, b"")
            + tlv(0xE0, b"x" * 300)), ProxyHeader(2, ("192.0.2.7", 51234), ("10.0.0.1", 443))),
    ],
)  # fmt: skip
def test_v2_headers_are_read_and_the_payload_is_left(header: bytes, expected: ProxyHeader) -> None:
    reader, taken = read(header + PAYLOAD)
    assert reader.done, reader.error
    assert taken == len(header)
    assert reader.header == expected


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + TCP4_BODY, "version 1"),
        (V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + TCP4_BODY, "version 3"),
        (v2(2, 0x11, TCP4_BODY), "unknown command"),
        (v2(0xF, 0x11, TCP4_BODY), "unknown command"),
        (v2(1, 0x41, TCP4_BODY), "unknown family"),
        (v2(1, 0x13, TCP4_BODY), "unknown transport"),
        (v2(1, 0x11, TCP4_BODY[:8]), "address block too short"),
        (v2(1, 0x21, TCP4_BODY), "an IPv6 block needs 36 bytes"),
        (v2(1, 0x11, TCP4_BODY + tlv(1, b"h2", length=3)), "TLV overruns"),
        (v2(1, 0x11, TCP4_BODY + tlv(1, b"", length=65535)), "huge TLV length"),
        (v2(1, 0x11, TCP4_BODY + b"\x01\x00"), "a truncated TLV head"),
        (v2(1, 0x11, TCP4_BODY + b"\x01"), "a truncated TLV head"),
    ],
)
def test_bad_v2_headers_fail(header: bytes, why: str) -> None:
    reader, _ = read(header + PAYLOAD)
    assert reader.failed, why
    assert reader.header is None and reader.error


def test_a_v2_header_of_the_greatest_length_streams_its_tlvs_without_buffering_them() -> None:
    tlvs = tlv(0xE0, b"v" * (65535 - 12 - 3))  # the length field's greatest value, in one TLV
    header = v2(1, 0x11, TCP4_BODY + tlvs)
    assert len(header) == 16 + 65535
    reader = HeaderReader()
    for offset in range(0, len(header), 500):
        assert reader.room() >= 1
        assert reader.feed(header[offset : offset + 500]) == len(header[offset : offset + 500])
        assert reader.buffered <= MAX_BUFFERED
    assert reader.done and reader.header is not None and reader.header.source == ("192.0.2.7", 51234)


# --------------------------------------------------------------- builders


def test_builders_match_the_spec_examples() -> None:
    assert build_header("v1", ("192.0.2.7", 51234), ("10.0.0.1", 443)) == \
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n"  # fmt: skip
    assert build_header("v2", ("192.0.2.7", 51234), ("10.0.0.1", 443)) == v2(1, 0x11, TCP4_BODY)
    assert build_local("v1") == b"PROXY UNKNOWN\r\n"
    assert build_local("v2") == v2(0, 0x00, b"")
    assert build_header("v2", None, ("10.0.0.1", 443)) == build_local("v2")
    assert build_header("v1", ("/run/a.sock", 0), ("10.0.0.1", 443)) == build_local("v1")


def test_mixed_families_are_sent_as_ipv6_with_the_ipv4_side_mapped() -> None:
    header = build_header("v1", ("2001:db8::7", 5), ("10.0.0.1", 443))
    assert header == b"PROXY TCP6 2001:db8::7 ::ffff:10.0.0.1 5 443\r\n"
    reader, _ = read(build_header("v2", ("192.0.2.7", 5), ("fe80::1%lo", 443)))
    assert reader.header == ProxyHeader(2, ("::ffff:192.0.2.7", 5), ("fe80::1", 443))


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(min_value=0, max_value=65535)
versions = st.sampled_from(["v1", "v2"])


@given(versions, addresses, ports, addresses, ports, st.binary(max_size=40))
def test_what_we_build_we_read_back(
    version: str, src: str, sport: int, dst: str, dport: int, payload: bytes
) -> None:
    header = build_header(version, (src, sport), (dst, dport))  # type: ignore[arg-type]
    reader, taken = read(header + payload)
    assert reader.done and taken == len(header)
    assert reader.header is not None and reader.header.source is not None
    assert reader.header.version == int(version[1])
    got_src, got_dst = reader.header.source, reader.header.destination
    assert got_dst is not None
    assert (got_src[1], got_dst[1]) == (sport, dport)
    if (":" in src) != (":" in dst):
        src, dst = (f"::ffff:{a}" if ":" not in a else a for a in (src, dst))
    assert ipaddress.ip_address(got_src[0]) == ipaddress.ip_address(src)
    assert ipaddress.ip_address(got_dst[0]) == ipaddress.ip_address(dst)


# ------------------------------------------------------------ fuzzing: never raise, never overread

valid_headers = st.one_of(
    st.builds(build_header, versions, st.tuples(addresses, ports), st.tuples(addresses, ports)),
    st.builds(build_local, versions),
    st.builds(
        lambda body, tlvs: v2(1, 0x11, body + b"".join(tlv(k, v) for k, v in tlvs)),
        st.binary(min_size=12, max_size=12),
        st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5),
    ),
)


def check_invariants(reader: HeaderReader, data: bytes, taken: int) -> None:
    assert 0 <= taken <= len(data)
    assert reader.buffered <= MAX_BUFFERED
    if not (reader.done or reader.failed):
        assert taken == len(data), "an incomplete header takes everything it is given"
        assert reader.room() >= 1
    assert reader.done == (reader.header is not None)
    assert reader.failed == bool(reader.error)


@pytest.mark.slow
@settings(max_examples=500)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_in_random_pieces_never_raise_or_overbuffer(pieces: list[bytes]) -> None:
    reader = HeaderReader()
    for piece in pieces:
        check_invariants(reader, piece, reader.feed(piece))


@pytest.mark.slow
@settings(max_examples=300)
@given(
    st.sampled_from([V1_MAX, MAX_BUFFERED]).flatmap(lambda n: st.binary(max_size=n)),
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE,
                     V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x21\x21", V2_SIGNATURE + b"\x20"]),
)  # fmt: skip
def test_plausible_prefixes_followed_by_random_bytes_never_raise(tail: bytes, prefix: bytes) -> None:
    data = prefix + tail
    reader = HeaderReader()
    check_invariants(reader, data, reader.feed(data))


@pytest.mark.slow
@settings(max_examples=200)
@given(valid_headers, st.binary(max_size=64))
def test_a_valid_header_truncated_at_every_offset_waits_for_more(header: bytes, payload: bytes) -> None:
    for cut in range(len(header)):
        reader = HeaderReader()
        taken = reader.feed(header[:cut])
        check_invariants(reader, header[:cut], taken)
        assert not reader.failed and not reader.done, (cut, reader.error)
        rest = header[cut:] + payload
        assert reader.feed(rest) == len(header) - cut
        assert reader.done


@pytest.mark.slow
@settings(max_examples=200)
@given(valid_headers, st.data())
def test_a_valid_header_in_random_pieces_reads_the_same_and_never_overreads(
    header: bytes, data: st.DataObject
) -> None:
    whole, _ = read(header)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(header)), max_size=6)))
    pieces = [header[a:b] for a, b in zip([0, *cuts], [*cuts, len(header)], strict=True)]
    reader = HeaderReader()
    for piece in pieces:
        check_invariants(reader, piece, reader.feed(piece))
    assert reader.feed(b"after the header") == 0
    assert reader.header == whole.header


@pytest.mark.slow
@settings(max_examples=300)
@given(valid_headers, st.data())
def test_a_corrupted_valid_header_never_raises(header: bytes, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(header) - 1))
    value = data.draw(st.integers(0, 255))
    corrupted = header[:index] + bytes([value]) + header[index + 1 :]
    reader = HeaderReader()
    check_invariants(reader, corrupted, reader.feed(corrupted))
    if index < 6 and corrupted[:6] not in (b"PROXY ", V2_SIGNATURE[:6]):
        assert reader.failed  # a wrong signature is refused


@pytest.mark.slow
@settings(max_examples=300)
@given(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 65535), st.binary(max_size=40)), max_size=4),
)  # fmt: skip
def test_any_v2_fixed_part_and_tlv_lengths_never_raise(
    version_command: int, family: int, length: int, tlvs: list[tuple[int, int, bytes]]
) -> None:
    body = TCP4_BODY + b"".join(tlv(k, v, length=n) for k, n, v in tlvs)
    data = V2_SIGNATURE + struct.pack("!BBH", version_command, family, length) + body
    reader = HeaderReader()
    check_invariants(reader, data, reader.feed(data))
    if reader.done:
        assert version_command >> 4 == 2 and version_command & 0xF <= 1
