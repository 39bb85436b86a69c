"""Reading JSON from a server that may be hostile: bounded depth, numbers, types and lines.

Theory of operation: whatever a server sends passes through here before it
is believed, and everything wrong becomes `EtcdBadResponse` with the call
and endpoint in the message (`what`).

- A body's nesting is measured before `json.loads` sees it (`too_deep`, in
  C loops), so the parser never recurses deeply; numbers longer than an
  int64 are refused while parsing (by Python's own int() digit bound, or a
  hook where that is off); NaN and Infinity too.
- Every field is read through `Fields`: an int64 written as a string of at
  most 19 ASCII digits or as a JSON integer, in its range; base64 that
  decodes strictly; booleans that are booleans; objects and lists that are.
  A missing field has its proto3 default, since the gateway leaves defaults
  out (a PUT event has no "type", a count of 0 no "count").
- A stream is split into lines by `Lines`, which refuses a line longer than
  its limit before buffering more: memory stays bounded.
"""

from __future__ import annotations

import binascii
import json
import re
import sys
from collections.abc import Callable
from typing import Any, Final, final

from trioanubis.cluster.errors import EtcdBadResponse, show

# Deepest JSON accepted: a txn answer nests 6 levels, a watch line 5; room for nested txns.
MAX_DEPTH: Final = 32
# Strings holding brackets: etcd's base64 and numbers never do, its error texts rarely; this many
# is not etcd, and keeps the one regex step of `too_deep` (a per-match cost) small.
MAX_BRACKETED_STRINGS: Final = 1024
# An int64 has at most 19 digits (and a sign).
MAX_DIGITS: Final = 20
# Python's own bound on int() (3.10.7+): converting this many digits is quick.
DIGITS_BOUNDED: Final = 4300
INT64_MAX: Final = 2**63 - 1

_MARKS = bytes.maketrans(b"{}", b"[]")
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}')
_STRINGS = re.compile(rb'"[^"]*"')


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests deeper than `limit` (or its brackets do not pair up).

    Linear, and all but step 4 in bytes methods (C loops without a per-match
    cost, as a regex over every string would have: 0.7 s for 15 MB of
    small strings): (1) escaped backslashes and quotes go, so that every quote
    left delimits a string; (2) only quotes and brackets are kept; (3)
    adjacent quotes go: an empty string, or two strings with nothing between
    them, whose merger changes no bracket outside them; (4) the strings left
    hold brackets and go, unless there are more than `MAX_BRACKETED_STRINGS`
    (then the answer is refused); (5) innermost bracket pairs are stripped
    `limit` times. 16 MB of any content takes at most about 0.3 s.
    """
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = text.translate(_MARKS, _NOT_MARKS).replace(b'""', b"")
    if b'"' in marks:
        if marks.count(b'"') > 2 * MAX_BRACKETED_STRINGS:
            return True
        marks = _STRINGS.sub(b"", marks)
    for _ in range(limit):
        if not marks:
            return False
        inner = marks.replace(b"[]", b"")
        if len(inner) == len(marks):
            return True  # nothing pairs up: not JSON
        marks = inner
    return bool(marks)


def _bounded_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)


def _int_parser() -> Callable[[str], int] | None:
    """None (json's own, 3x faster) when the interpreter bounds int() itself (4300 digits by default)."""
    bound = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return None if 0 < bound <= DIGITS_BOUNDED else _bounded_int


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not a number etcd sends")


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """The JSON object in `data`; EtcdBadResponse if it is not one, or too deep."""
    if too_deep(data):
        raise EtcdBadResponse(f"{what}: the answer nests deeper than {MAX_DEPTH} levels, or is not etcd JSON")
    try:
        document = json.loads(data, parse_int=_int_parser(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EtcdBadResponse(f"{what}: the answer is not JSON ({show(str(exc))}): {show(data)}") from None
    if not isinstance(document, dict):
        raise EtcdBadResponse(f"{what}: the answer is not a JSON object: {show(data)}")
    return document


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_INT64_TEXT = re.compile(r"-?[0-9]{1,19}")


@final
class Fields:
    """Typed reads of one JSON object of an answer; a wrong type or range is EtcdBadResponse."""

    __slots__ = ("_object", "what")

    def __init__(self, value: object, what: str, name: str = "answer") -> None:
        if not isinstance(value, dict):
            raise EtcdBadResponse(f"{what}: {name} is not an object: {show(repr(value))}")
        self._object: dict[str, Any] = value
        self.what = what

    def _bad(self, name: str, expected: str, raw: object) -> EtcdBadResponse:
        return EtcdBadResponse(f"{self.what}: {name} is not {expected}: {show(repr(raw))}")

    def number(self, name: str, low: int = 0, high: int = INT64_MAX) -> int:
        """An int64 field (JSON string or integer) within [low, high]; 0 when absent."""
        raw = self._object.get(name, 0)
        if type(raw) is str and _INT64_TEXT.fullmatch(raw):  # not int()'s "_", spaces or "+"
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise self._bad(name, f"an integer in [{low}, {high}]", raw)
        return raw

    def blob(self, name: str) -> bytes:
        """A bytes field (base64, decoded strictly); empty when absent."""
        raw = self._object.get(name, "")
        if not isinstance(raw, str) or not _BASE64.fullmatch(raw):
            raise self._bad(name, "base64 text", raw)
        try:
            return binascii.a2b_base64(raw)
        except binascii.Error:
            raise self._bad(name, "base64 text", raw) from None

    def text(self, name: str) -> str:
        raw = self._object.get(name, "")
        if not isinstance(raw, str):
            raise self._bad(name, "text", raw)
        return raw

    def flag(self, name: str) -> bool:
        raw = self._object.get(name, False)
        if not isinstance(raw, bool):
            raise self._bad(name, "true or false", raw)
        return raw

    def child(self, name: str) -> Fields:
        return Fields(self._object.get(name, {}), self.what, name)

    def children(self, name: str) -> list[Fields]:
        raw = self._object.get(name, [])
        if not isinstance(raw, list):
            raise self._bad(name, "a list", raw)
        return [Fields(item, self.what, name) for item in raw]

    def has(self, name: str) -> bool:
        return name in self._object


@final
class Lines:
    """Splits a stream into lines; a line longer than `limit` is EtcdBadResponse, so memory stays bounded."""

    def __init__(self, limit: int, what: str) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._limit = limit
        self._what = what

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next line that is not blank, without its newline; None until one is whole."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                self._check(self._scanned)
                return None
            self._check(end)
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.strip():
                return line

    def rest(self) -> bytes:
        """What is left after the last newline (a stream's last line may lack one)."""
        rest, self._buffer, self._scanned = bytes(self._buffer), bytearray(), 0
        return rest if rest.strip() else b""

    def _check(self, length: int) -> None:
        if length > self._limit:
            raise EtcdBadResponse(f"{self._what}: a line of the stream exceeds {self._limit} bytes")
