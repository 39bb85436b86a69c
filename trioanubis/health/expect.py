"""Send/expect health checks without I/O: presets and the reply matchers.

Theory of operation: a check that speaks a protocol is a `Plan`: bytes to
send when connected (possibly none: the server speaks first), a factory for a
`Matcher` that judges the reply, and bytes to send after a pass (a polite
goodbye such as PostgreSQL's Terminate). `plan_for` builds the plan of a
check kind from plain values; `health/probe.py` is the I/O shell that sends,
reads and feeds.

A matcher is fed the reply as it arrives and answers `None` (need more) or a
`Verdict`. It owns the read bound: `room` is how many more bytes it will
accept, the shell never reads more than that, and a matcher whose room
reaches zero always has a verdict, so no reply can make a check read beyond
`expect_bytes` or wait for more than the bound. `eof()` and `timed_out()`
give the verdict when the server closes or the check's time is up.

Failure reasons quote what was received, printable and truncated
(`expected '+PONG', got '-LOADING Redis is loading…'`), because they go to
the log and to /stats as they are.

Matchers: `Substring` and `Regex` (generic `send_expect` and `banner`),
`FirstLine` (the redis and smtp presets decide on the first line, so a
`-LOADING` or a `554` fails at once instead of at the timeout),
`PostgresReply` (AuthenticationRequest or ReadyForQuery passes, an
ErrorResponse fails with its SQLSTATE and message) and `MySQLHandshake`
(protocol 10 passes, an error packet fails with its code and message).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from trioanubis.config.values import compile_regex

# How much of a reply a failure reason quotes: enough to recognise an error
# line, short enough for one log line.
SHOW_LIMIT: Final = 60

# PostgreSQL's protocol 3.0 and its Terminate message (type 'X', length 4).
PG_PROTOCOL_3: Final = 196608
PG_TERMINATE: Final = b"X\x00\x00\x00\x04"

REDIS_PING: Final = b"PING\r\n"
REDIS_PONG: Final = b"+PONG"
SMTP_READY: Final = b"220"


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str


class Matcher:
    """Judges one reply fed in pieces; `room` bytes may still be fed."""

    def __init__(self, limit: int) -> None:
        self.received = bytearray()
        self.limit = limit

    @property
    def room(self) -> int:
        return self.limit - len(self.received)

    def feed(self, data: bytes) -> Verdict | None:
        """Take the next piece of the reply (anything beyond `room` is ignored)."""
        self.received += data[: self.room]
        verdict = self.judge()
        if verdict is None and self.room <= 0:
            return self.fail(f"within {self.limit} bytes")
        return verdict

    def judge(self) -> Verdict | None:
        raise NotImplementedError

    def wanted(self) -> str:
        raise NotImplementedError

    def fail(self, context: str = "") -> Verdict:
        where = f" {context}" if context else ""
        return Verdict(False, f"expected {self.wanted()}{where}, got {show(bytes(self.received))}")

    def eof(self) -> Verdict:
        return self.judge() or self.fail("before the server closed")

    def timed_out(self) -> Verdict:
        return Verdict(False, f"timeout: {self.fail().reason}")


@final
class Substring(Matcher):
    def __init__(self, expect: bytes, limit: int) -> None:
        super().__init__(limit)
        self.expect = expect

    def judge(self) -> Verdict | None:
        return Verdict(True, f"got {show(self.expect)}") if self.expect in self.received else None

    def wanted(self) -> str:
        return show(self.expect)


@final
class Regex(Matcher):
    def __init__(self, pattern: re.Pattern[bytes], limit: int) -> None:
        super().__init__(limit)
        self.pattern = pattern

    def judge(self) -> Verdict | None:
        match = self.pattern.search(self.received)
        return Verdict(True, f"got {show(match.group(0))}") if match else None

    def wanted(self) -> str:
        return f"/{self.pattern.pattern.decode(errors='replace')}/"


@final
class FirstLine(Matcher):
    """The first line (up to LF) must start with `prefix`; decided as soon as it is complete."""

    def __init__(self, prefix: bytes, limit: int) -> None:
        super().__init__(limit)
        self.prefix = prefix

    def judge(self) -> Verdict | None:
        end = self.received.find(b"\n")
        if end < 0:
            if not self.prefix.startswith(self.received[: len(self.prefix)]):
                return self.fail()  # wrong from its first bytes: no need to wait for the line end
            return None
        line = bytes(self.received[:end]).rstrip(b"\r")
        if line.startswith(self.prefix):
            return Verdict(True, f"got {show(line)}")
        return Verdict(False, f"expected {self.wanted()}, got {show(line)}")

    def wanted(self) -> str:
        return show(self.prefix)


@final
class PostgresReply(Matcher):
    """The answer to a startup: a password request or ReadyForQuery passes, 'E' fails.

    AuthenticationOk (trust) is not the end: the role or the database may still be
    refused, so the messages after it (ParameterStatus, BackendKeyData, notices)
    are skipped until ReadyForQuery or an ErrorResponse.
    """

    def judge(self) -> Verdict | None:
        data = self.received
        offset = 0
        while len(data) - offset >= 5:
            kind = bytes(data[offset : offset + 1])
            (length,) = struct.unpack_from("!I", data, offset + 1)
            if length < 4 or (kind == b"R" and length < 8):
                return self.fail(f"(a {kind!r} message of length {length})")
            if kind == b"Z":
                return Verdict(True, "ready for query")
            if kind == b"R" and len(data) - offset >= 9:
                (code,) = struct.unpack_from("!I", data, offset + 5)
                if code:  # a password is asked for: the server takes startups
                    return Verdict(True, f"authentication request {code}")
            if kind not in (b"E", b"N", b"v", b"R", b"S", b"K"):
                return self.fail()
            end = offset + 1 + length
            if end > len(data):
                return None  # wait for the whole message (the bound cuts a huge one)
            if kind == b"E":
                return _pg_refused(bytes(data[offset + 5 : end]))
            offset = end
        return None

    def wanted(self) -> str:
        return "an authentication request or ReadyForQuery"

    def fail(self, context: str = "") -> Verdict:
        if len(self.received) >= 5 and self.received[:1] == b"E":
            return _pg_refused(bytes(self.received[5:]))
        return super().fail(context)


@final
class MySQLHandshake(Matcher):
    """The server's first packet: protocol 10 passes, an error packet (0xff) fails."""

    def judge(self) -> Verdict | None:
        data = self.received
        if len(data) < 5:
            return None
        length = data[0] | data[1] << 8 | data[2] << 16
        if length == 0:
            return self.fail("(an empty packet)")
        payload = bytes(data[4 : 4 + length])
        complete = len(payload) == length
        if payload[0] == 10:
            version, nul, _ = payload[1:].partition(b"\x00")
            if not nul and not complete:
                return None
            return Verdict(True, f"mysql handshake, server {show(version)}")
        if payload[0] == 0xFF:
            if not complete:
                return None
            return Verdict(False, f"mysql refused: {mysql_error(payload)}")
        return self.fail()

    def wanted(self) -> str:
        return "a MySQL handshake (protocol 10)"

    def fail(self, context: str = "") -> Verdict:
        if len(self.received) >= 5 and self.received[4] == 0xFF:
            return Verdict(False, f"mysql refused: {mysql_error(bytes(self.received[4:]))}")
        return super().fail(context)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one protocol check sends, how it judges the reply, and what it sends after a pass."""

    send: bytes
    matcher: Callable[[], Matcher]
    farewell: bytes = b""


def plan_for(
    check: str,
    *,
    send: bytes | None = None,
    expect: bytes = b"",
    expect_regex: str = "",
    expect_bytes: int = 4096,
    user: str = "postgres",
) -> Plan:
    """The plan of check kind `check`; `send is None` means "not configured" (presets fill it)."""
    generic = _generic_matcher(expect, expect_regex, expect_bytes)
    if check == "redis":
        if send is None and generic is None:
            return Plan(REDIS_PING, lambda: FirstLine(REDIS_PONG, expect_bytes))
        return Plan(REDIS_PING if send is None else send,
                    generic or (lambda: Substring(REDIS_PONG, expect_bytes)))  # fmt: skip
    if check == "smtp":
        return Plan(b"", generic or (lambda: FirstLine(SMTP_READY, expect_bytes)))
    if check == "postgres":
        return Plan(pg_startup(user), lambda: PostgresReply(expect_bytes), PG_TERMINATE)
    if check == "mysql":
        return Plan(b"", lambda: MySQLHandshake(expect_bytes))
    if generic is None:
        raise ValueError(f"check {check!r} needs expect or expect_regex")
    return Plan(send or b"", generic)


def _generic_matcher(expect: bytes, expect_regex: str, limit: int) -> Callable[[], Matcher] | None:
    if expect_regex:
        pattern = compile_regex(expect_regex)
        return lambda: Regex(pattern, limit)
    if expect:
        return lambda: Substring(expect, limit)
    return None


# ------------------------------------------------------------------ wire formats


def pg_startup(user: str, database: str = "") -> bytes:
    """A protocol 3.0 StartupMessage for `user` (the database defaults to the user's name)."""
    params = b"user\x00" + user.encode() + b"\x00"
    if database:
        params += b"database\x00" + database.encode() + b"\x00"
    params += b"application_name\x00trioanubis-health\x00\x00"
    return struct.pack("!II", 8 + len(params), PG_PROTOCOL_3) + params


def _pg_refused(fields: bytes) -> Verdict:
    return Verdict(False, f"postgres refused the startup: {pg_error(fields)}")


def pg_error(fields: bytes) -> str:
    """'SQLSTATE: message' from an ErrorResponse body (type-tagged, NUL-terminated fields)."""
    found: dict[int, bytes] = {}
    for field in fields.split(b"\x00"):
        if field:
            found.setdefault(field[0], field[1:])
    code = found.get(ord("C"), b"")
    message = found.get(ord("M"), b"(no message)")
    return f"{show(code, quote=False)} {show(message, quote=False)}".strip()


def mysql_error(payload: bytes) -> str:
    """'code: message' from an ERR packet's payload (0xff, code, optional '#SQLSTATE', text)."""
    if len(payload) < 3:
        return "error packet"
    code = payload[1] | payload[2] << 8
    text = payload[3:]
    if text[:1] == b"#":
        text = text[6:]
    return f"{code} {show(text, quote=False)}"


# ------------------------------------------------------------------ showing


def show(data: bytes, limit: int = SHOW_LIMIT, *, quote: bool = True) -> str:
    """`data` printable (escapes for the rest), cut at `limit` characters with '…'."""
    if not data:
        return "nothing" if quote else ""
    text = "".join(_printable(b) for b in data[: limit + 1])
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"'{text}'" if quote else text


def _printable(byte: int) -> str:
    if 0x20 <= byte < 0x7F and byte != 0x5C:
        return chr(byte)
    return {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t", 0x5C: "\\\\"}.get(byte, f"\\x{byte:02x}")
