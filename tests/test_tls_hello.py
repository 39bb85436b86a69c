"""The sans-IO ClientHello reader and the SNI route table: real hellos, built ones, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import real_hello
from trioanubis.config import Route, check_pattern
from trioanubis.proxy.sni_routes import RouteTable
from trioanubis.tls.hello import MAX_BUFFERED, MAX_RECORD, Hello, HelloReader

GREASE = [0x0A0A, 0x1A1A, 0x2A2A, 0xFAFA]


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", kind, len(name)) + name for kind, name in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


def alpn_extension(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return extension(16, struct.pack("!H", len(entries)) + entries)


def hello_body(extensions: list[bytes]) -> bytes:
    joined = b"".join(extensions)
    return (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00"
            + struct.pack("!H", len(joined)) + joined)  # fmt: skip


def records(body: bytes, record_size: int = MAX_RECORD) -> bytes:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for start in range(0, len(message), record_size):
        fragment = message[start : start + record_size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(fragment)) + fragment
    return out


def read(data: bytes, pieces: int = 1) -> Hello:
    reader = HelloReader()
    step = max(1, len(data) // pieces)
    result = reader.feed(b"")
    for start in range(0, len(data), step):
        result = reader.feed(data[start : start + step])
        assert len(reader.data) <= MAX_BUFFERED
    return result


def test_a_real_client_hello_gives_its_name_and_alpn() -> None:
    result = read(real_hello("API.Example.com", ["h2", "http/1.1"]))
    assert result == Hello("hello", "api.example.com", ("h2", "http/1.1"))


@pytest.mark.slow
def test_no_server_name() -> None:
    assert read(real_hello(None)) == Hello("hello")


def test_one_byte_at_a_time_and_many_records() -> None:
    body = hello_body([sni_extension((0, b"a.example.com")), alpn_extension(b"h2")])
    for size in (1, 2, 7, 50):
        assert read(records(body, size), pieces=len(body)) == Hello("hello", "a.example.com", ("h2",))


def test_not_tls_and_empty() -> None:
    assert read(b"GET / HTTP/1.1\r\n").status == "not_tls"
    assert HelloReader().feed(b"").status == "need_more"


@pytest.mark.slow
def test_truncation_at_every_offset_needs_more() -> None:
    data = real_hello("web.example.com", ["h2"])
    for cut in range(1, len(data)):
        assert read(data[:cut]).status == "need_more", cut


@pytest.mark.slow
def test_several_names_and_grease_the_first_host_name_wins() -> None:
    names = sni_extension((7, b"x"), (0, b"one.test"), (0, b"two.test"))
    body = hello_body([extension(GREASE[0], b""), names, extension(GREASE[1], b"\x00"),
                       alpn_extension(b"\x0a\x0a", b"h2")])  # fmt: skip
    assert read(records(body)) == Hello("hello", "one.test", ("\n\n", "h2"))


@pytest.mark.slow
def test_errors() -> None:
    assert read(b"\x16\x03\x01\x40\x01").error.startswith("record of 16385 bytes")
    assert read(b"\x16\x02\x00\x00\x05").status == "error"
    assert read(records(hello_body([sni_extension((0, b"bad name"))]))).status == "error"
    duplicated = hello_body([alpn_extension(b"h2"), alpn_extension(b"h2")])
    assert "twice" in read(records(duplicated)).error
    assert read(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00").status == "error"  # a ServerHello
    assert read(b"\x16\x03\x01\x00\x05" + b"\x01\xff\xff\xff\x00").status == "error"  # too long


@pytest.mark.slow
def test_a_hello_bigger_than_the_buffer_is_an_error() -> None:
    body = hello_body([extension(0xFFF0, bytes(20000)), sni_extension((0, b"late.test"))])
    result = read(records(body), pieces=10)
    assert result.status == "error"
    reader = HelloReader()
    assert reader.feed(bytes([22]) + bytes(MAX_BUFFERED)).status == "error"


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.permutations([b"sni", b"alpn", b"grease1", b"grease2", b"other"]),
    st.integers(min_value=1, max_value=300),
    st.integers(min_value=1, max_value=40),
)
def test_extensions_in_any_order_any_split(order: list[bytes], record_size: int, pieces: int) -> None:
    parts = {b"sni": sni_extension((0, b"x.example.org")), b"alpn": alpn_extension(b"h2", b"http/1.1"),
             b"grease1": extension(GREASE[2], b""), b"grease2": extension(GREASE[3], b"\x00\x01"),
             b"other": extension(43, b"\x02\x03\x04")}  # fmt: skip
    data = records(hello_body([parts[name] for name in order]), record_size)
    if len(data) > MAX_BUFFERED:
        return
    assert read(data, pieces) == Hello("hello", "x.example.org", ("h2", "http/1.1"))


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_garbage_never_raises(data: bytes, pieces: int) -> None:
    result = read(data, pieces)
    assert result.status in ("need_more", "hello", "not_tls", "error")


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_hellos_never_raise(data: st.DataObject) -> None:
    hello = bytearray(FUZZ_HELLO)
    for _ in range(data.draw(st.integers(1, 8))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(hello)))
    result = read(bytes(hello[:cut]), data.draw(st.integers(1, 20)))
    assert result.status in ("need_more", "hello", "not_tls", "error")


FUZZ_HELLO = real_hello("fuzz.example.com", ["h2"])


@pytest.mark.slow
def test_route_matching() -> None:
    table = RouteTable([Route("api.example.com", "api"), Route("*.example.com", "web"),
                        Route("*.b.example.com", "deep"), Route("h2.example.com", "h2", alpn="h2"),
                        Route("h2.example.com", "h1")])  # fmt: skip
    assert table.pick("api.example.com") == "api"
    assert table.pick("x.example.com") == "web"
    assert table.pick("x.y.example.com") == "web"
    assert table.pick("x.b.example.com") == "deep"
    assert table.pick("example.com") == ""
    assert table.pick("") == ""
    assert table.pick("h2.example.com", ("http/1.1", "h2")) == "h2"
    assert table.pick("h2.example.com", ("http/1.1",)) == "h1"
    only_alpn = RouteTable([Route("a.test", "p", alpn="h2")])
    assert only_alpn.pick("a.test") == ""


def test_patterns() -> None:
    assert check_pattern("*.Example.COM.") == "*.example.com"
    for bad in ("", "*", "a.*.b", "**.a", "a..b", "-a.b", "a b", "*.", "é.test"):
        try:
            check_pattern(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
