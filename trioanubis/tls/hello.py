"""The TLS ClientHello, sans-IO: bytes in → "need more", the server name and ALPN, "not TLS" or an error.

Theory of operation: a `HelloReader` is fed the first bytes a client sends,
in whatever pieces the network delivers them, and keeps every byte fed
(`data`), because SNI routing relays the ClientHello unchanged to the server
it picks. It reads TLS records as they complete: each must be a handshake
record (content type 22, version 3.x, at most 2^14 bytes: RFC 8446 §5.1),
and their payloads are joined until the first handshake message, which must
be a ClientHello, is whole. So a ClientHello split over many TCP segments and
over several records is read the same as one in a single segment.

Bounds: at most `MAX_BUFFERED` bytes (one full record and its header, 16 KiB
+ 5) are ever held; a ClientHello that needs more is an error, as is a record
that declares more than 2^14 bytes. Each byte is looked at a bounded number
of times (records are parsed once, when complete), so a client sending one
byte per segment costs linear work, not quadratic.

`feed` never raises on input: every malformed length, truncated field or
duplicated extension becomes a `Hello` whose `status` is "error" with a
reason. After any result other than "need_more" the reader is finished and
further input is ignored.

What is read from the ClientHello: the first `host_name` entry of the
server_name extension (RFC 6066 §3), lower-cased, a trailing dot removed,
and required to be a plausible DNS name (letters, digits, "-", "_", "."); and
the protocols of the ALPN extension (RFC 7301). Unknown extensions (GREASE
values included, RFC 8701) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, final

# A TLS record's payload is at most 2^14 bytes (RFC 8446 §5.1).
MAX_RECORD: Final = 16384
RECORD_HEADER: Final = 5
# The most bytes a reader holds: one whole maximum record with its header.
MAX_BUFFERED: Final = MAX_RECORD + RECORD_HEADER

HANDSHAKE: Final = 22
CLIENT_HELLO: Final = 1
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
HOST_NAME: Final = 0

# A DNS name as a client may send it (underscores occur in real names); 253 characters at most.
_NAME: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?")

Status = Literal["need_more", "hello", "not_tls", "error"]


@final
@dataclass(frozen=True, slots=True)
class Hello:
    """What a ClientHello said, or why there is none (yet)."""

    status: Status
    server_name: str = ""  # "" when the client sent none
    alpn: tuple[str, ...] = ()
    error: str = ""


NEED_MORE: Final = Hello("need_more")
NOT_TLS: Final = Hello("not_tls")


class _Malformed(Exception):
    """Raised inside the parser only; `feed` turns it into an "error" Hello."""


@final
class HelloReader:
    """Reads one ClientHello from the bytes a client sends first."""

    def __init__(self) -> None:
        self.data = bytearray()  # every byte fed: relayed unchanged once a pool is picked
        self.result = NEED_MORE
        self._parsed = 0  # offset in `data` of the first record not parsed yet
        self._handshake = bytearray()  # handshake payload joined from the records so far

    def room(self) -> int:
        """How many more bytes the reader may be fed (0 once it has a result)."""
        if self.result is not NEED_MORE:
            return 0
        return MAX_BUFFERED - len(self.data)

    def feed(self, data: bytes) -> Hello:
        """Add bytes the client sent; the result so far. Bytes beyond `room()` are an error."""
        if self.result is not NEED_MORE:
            return self.result
        if len(data) > self.room():
            self.result = Hello("error", error=f"no whole ClientHello in the first {MAX_BUFFERED} bytes")
            return self.result
        self.data += data
        try:
            self.result = self._advance()
        except _Malformed as exc:
            self.result = Hello("error", error=str(exc))
        except Exception as exc:  # a parser bug must not reach the connection; say what it was
            self.result = Hello("error", error=f"unparsable ClientHello ({type(exc).__name__})")
        return self.result

    def _advance(self) -> Hello:
        data = self.data
        if data and data[0] != HANDSHAKE:
            return NOT_TLS
        while len(data) - self._parsed >= RECORD_HEADER:
            start = self._parsed
            kind, major = data[start], data[start + 1]
            length = int.from_bytes(data[start + 3 : start + 5], "big")
            if kind != HANDSHAKE:
                raise _Malformed(f"record type {kind} before the ClientHello was whole")
            if major != 3:
                raise _Malformed(f"record version {major}.{data[start + 2]} is not TLS")
            if length > MAX_RECORD:
                raise _Malformed(f"record of {length} bytes exceeds {MAX_RECORD}")
            if length == 0:
                raise _Malformed("empty handshake record")
            end = start + RECORD_HEADER + length
            if end > MAX_BUFFERED:
                raise _Malformed(f"no whole ClientHello in the first {MAX_BUFFERED} bytes")
            if len(data) < end:
                return NEED_MORE
            self._handshake += data[start + RECORD_HEADER : end]
            self._parsed = end
            hello = self._try_message()
            if hello is not None:
                return hello
        return NEED_MORE

    def _try_message(self) -> Hello | None:
        message = self._handshake
        if len(message) < 4:
            return None
        if message[0] != CLIENT_HELLO:
            raise _Malformed(f"handshake message type {message[0]} is not a ClientHello")
        length = int.from_bytes(message[1:4], "big")
        if length > MAX_BUFFERED:
            raise _Malformed(f"ClientHello of {length} bytes exceeds {MAX_BUFFERED}")
        if len(message) < 4 + length:
            return None
        return parse_client_hello(bytes(message[4 : 4 + length]))


@final
class _Cursor:
    """Reads big-endian fields from a bytes object; `_Malformed` when one runs past the end."""

    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.end = data, 0, len(data)
        self.what = what

    def take(self, count: int, field: str) -> bytes:
        if self.pos + count > self.end:
            raise _Malformed(f"{self.what}: {field} runs past the end")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def number(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, size: int, field: str) -> _Cursor:
        """A length-prefixed field (the length in `size` bytes) as a cursor of its own."""
        return _Cursor(self.take(self.number(size, f"{field} length"), field), field)

    @property
    def done(self) -> bool:
        return self.pos >= self.end


def parse_client_hello(body: bytes) -> Hello:
    """The server name and ALPN list of a whole ClientHello body (after the 4-byte message header)."""
    try:
        return _parse_body(_Cursor(body, "ClientHello"))
    except _Malformed as exc:
        return Hello("error", error=str(exc))


def _parse_body(hello: _Cursor) -> Hello:
    hello.take(2 + 32, "version and random")
    if len(hello.vector(1, "session id").data) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = hello.vector(2, "cipher suites")
    if not suites.end or suites.end % 2:
        raise _Malformed(f"cipher suites of odd or zero length {suites.end}")
    if not hello.vector(1, "compression methods").end:
        raise _Malformed("no compression method")
    if hello.done:  # a ClientHello without extensions (old clients): no name, no ALPN
        return Hello("hello")
    extensions = hello.vector(2, "extensions")
    if not hello.done:
        raise _Malformed("bytes after the extensions")
    return _parse_extensions(extensions)


def _parse_extensions(extensions: _Cursor) -> Hello:
    seen: set[int] = set()
    name: str = ""
    alpn: tuple[str, ...] = ()
    while not extensions.done:
        kind = extensions.number(2, "extension type")
        content = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _server_name(content)
        elif kind == EXT_ALPN:
            alpn = _alpn(content)
    return Hello("hello", server_name=name, alpn=alpn)


def _server_name(content: _Cursor) -> str:
    if content.done:  # a server's empty echo; from a client it means nothing
        return ""
    names = content.vector(2, "server name list")
    if not content.done:
        raise _Malformed("bytes after the server name list")
    found = ""
    while not names.done:
        kind = names.number(1, "server name type")
        value = names.vector(2, "server name").data
        if kind == HOST_NAME and not found:
            found = _host_name(value)
    return found


def _host_name(raw: bytes) -> str:
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise _Malformed("server name is not ASCII") from None
    name = name.removesuffix(".")
    if not _NAME.fullmatch(name) or ".." in name:
        raise _Malformed(f"server name {name[:64]!r} is not a DNS name")
    return name


def _alpn(content: _Cursor) -> tuple[str, ...]:
    protocols = content.vector(2, "ALPN list")
    if not content.done:
        raise _Malformed("bytes after the ALPN list")
    found = []
    while not protocols.done:
        value = protocols.vector(1, "ALPN protocol").data
        if not value:
            raise _Malformed("empty ALPN protocol name")
        found.append(value.decode("latin-1"))
    return tuple(found)
