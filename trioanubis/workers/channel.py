"""The control channel between the supervisor and one worker: JSON objects, one per line.

Theory of operation: `encode` turns a message (a JSON object with a string
`t`, its type) into one line; `LineDecoder` is sans-IO: `feed` bytes as they
arrive and it returns the whole messages they completed. A line longer than
`MAX_LINE`, bytes that are not UTF-8 JSON, a value that is not an object or
has no string `t` raise `ChannelError`; the decoder keeps nothing of a bad
line, so both ends can log it and go on. `Channel` is the thin I/O shell: a
socket stream, a decoder, and a lock so that concurrent senders never
interleave their lines.

Both ends are our own processes, but the codec is still strict and fuzzed: a
bug on one side must surface as one logged error, never as a crashed peer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, final

import trio

from trioanubis.errors import ChannelError

# The biggest message is a worker's /stats or /metrics answer: a few hundred
# bytes per server; 16 MiB covers tens of thousands of servers.
MAX_LINE: Final = 16 << 20
# A JSON nesting depth our messages never reach (json.loads recurses per level).
MAX_DEPTH: Final = 32
RECEIVE_SIZE: Final = 65536

Message = dict[str, Any]


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one line (compact JSON, ASCII only, so no newline can hide in it)."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> Message:
    """One line (without its newline) as a message; ChannelError when it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ChannelError("control message is not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise ChannelError(f"control message nests deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ChannelError(f"control message is not JSON: {text[:60]!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ChannelError(f"control message is not an object with a type: {text[:60]!r}")
    return message


def integer(message: Mapping[str, Any], key: str) -> int:
    """`message[key]` when it is an integer (seq, id); ValueError otherwise (a float, even 1e309, too)."""
    value = message[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {str(value)[:40]!r}")
    return value


def _depth(text: str) -> int:
    """An upper bound of the nesting depth (brackets inside strings count too: safe side)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


@final
class LineDecoder:
    """Bytes in, whole messages out; bad lines raise ChannelError and are dropped."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False  # inside a line already reported too long
        self.pending: list[Message] = []  # the good messages fed along with a bad line

    def feed(self, data: bytes) -> list[Message]:
        """The messages `data` completes. A bad line raises after the good ones before it are kept."""
        self._buffer += data
        messages: list[Message] = []
        errors: list[ChannelError] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            try:
                messages.append(decode_line(line))
            except ChannelError as exc:
                errors.append(exc)
        if len(self._buffer) > self.max_line:
            self._buffer.clear()
            if not self._skipping:
                self._skipping = True
                errors.append(ChannelError(f"control message longer than {self.max_line} bytes"))
        if errors:
            self.pending = messages
            raise errors[0]
        return messages


@final
class Channel:
    """One end of a control channel over a stream socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = LineDecoder()
        self._ready: list[Message] = []
        self._send_lock = trio.Lock()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message; raises trio.BrokenResourceError/ClosedResourceError if the peer left."""
        async with self._send_lock:
            await self.stream.send_all(encode(message))

    async def receive(self) -> Message | None:
        """The next message, or None at end of stream; bad lines raise ChannelError."""
        while not self._ready:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return None
            try:
                self._ready += self.decoder.feed(data)
            except ChannelError:
                self._ready += self.decoder.pending
                raise
        return self._ready.pop(0)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
