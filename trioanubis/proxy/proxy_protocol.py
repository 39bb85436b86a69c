"""The PROXY protocol (versions 1 and 2), sans-IO: read a header from bytes, build one.

Theory of operation: a balancer in front of us (HAProxy `send-proxy`, AWS NLB,
nginx `proxy_protocol on`) prefixes each connection with a header naming the
client it accepted; we do the same for our servers (`send_proxy`). The wire
format is HAProxy's spec (doc/proxy-protocol.txt):

- v1, text: ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (``TCP6``, or
  ``UNKNOWN`` and anything up to CRLF), at most 107 bytes;
- v2, binary: a 12-byte signature, version/command, family/transport, a
  16-bit length, then the addresses and type-length-value records (TLVs).

`HeaderReader` is fed bytes and takes only those that belong to the header,
never one byte beyond its end, so the caller can peek at the socket, feed,
and consume exactly what was taken: the client's own first bytes stay in the
kernel for the relay. It never raises on input: it ends `done` with a
`ProxyHeader` or `failed` with a reason, and rejects garbage at the first byte
that cannot start a header. It holds at most `MAX_BUFFERED` bytes (the v2
fixed part plus the largest address block); TLVs are checked (each must fit
in the header) and skipped as they stream past, never buffered, so a header
of any length the format allows costs the same memory.

What the addresses mean: a v1 ``UNKNOWN``, a v2 ``LOCAL`` command (a health
check from the proxy itself), and a v2 ``PROXY`` with a family or transport
other than TCP over IPv4/IPv6 (AF_UNSPEC, AF_UNIX, UDP) carry no client for
us: `ProxyHeader.source` is None and the connection's own endpoints apply,
as HAProxy does. Values the spec reserves (version, command, family,
transport) are rejected.

The builders take (host, port) pairs as sockets report them; a pair of
different families is sent as IPv6 with the IPv4 side mapped (::ffff:a.b.c.d),
like HAProxy.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final, Literal, final

ProxyVersion = Literal["v1", "v2"]
HostPort = tuple[str, int]

V1_PREFIX: Final = b"PROXY "
V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"
# The longest v1 line the spec allows ("PROXY TCP6 " + two full IPv6 addresses + ports + CRLF).
V1_MAX: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version/command, family/transport, length
# Address block sizes by family (v2): AF_INET, AF_INET6, AF_UNIX; AF_UNSPEC has none.
_V2_ADDRESS_SIZE: Final = {0: 0, 1: 12, 2: 36, 3: 216}
# The most a reader ever holds: the v2 fixed part plus the largest address block.
MAX_BUFFERED: Final = V2_FIXED + 216
# How many bytes the caller should look at per step (peek size): more than any
# header but its TLVs, small enough to be a trivial transient allocation.
PEEK_SIZE: Final = 512

_V2_PROXY: Final = 0x21  # version 2, command PROXY
_V2_LOCAL: Final = 0x20  # version 2, command LOCAL
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21
_V2_STREAM: Final = 1
_TLV_HEAD: Final = 3  # type (1 byte) and length (2 bytes)

# Reader phases.
_DETECT: Final = 0  # which version: "PROXY " or the v2 signature
_V1_LINE: Final = 1  # v1: up to CRLF
_V2_HEAD: Final = 2  # v2: the rest of the 16-byte fixed part
_V2_ADDRESSES: Final = 3  # v2: the address block
_V2_TLVS: Final = 4  # v2: TLVs, checked and skipped
_V2_SKIP: Final = 5  # v2: a payload we ignore whole (LOCAL, AF_UNSPEC, AF_UNIX, UDP)
_DONE: Final = 6
_FAILED: Final = 7


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A header read from a peer: the client it names, or None when the connection's own endpoints apply."""

    version: int  # 1 or 2
    source: HostPort | None  # the client; None for v1 UNKNOWN, v2 LOCAL, and non-TCP families
    destination: HostPort | None  # where the client connected to


@final
class HeaderReader:
    """Reads one PROXY protocol header (v1 or v2, detected) from bytes fed in any pieces."""

    __slots__ = ("_address_size", "_addresses", "_buffer", "_left", "_phase", "_tlv", "_tlv_left", "error",
                 "header")  # fmt: skip

    def __init__(self) -> None:
        self._buffer = bytearray()  # the part being parsed; at most MAX_BUFFERED bytes
        self._phase = _DETECT
        self._left = 0  # v2: payload bytes still to come
        self._address_size = 0
        self._tlv = bytearray()  # the current TLV's type and length, while incomplete
        self._tlv_left = 0  # value bytes of the current TLV still to skip
        self._addresses = ProxyHeader(2, None, None)  # v2: what the address block said, while TLVs pass
        self.header: ProxyHeader | None = None
        self.error = ""  # why the header is invalid, once it is

    @property
    def done(self) -> bool:
        return self._phase == _DONE

    @property
    def failed(self) -> bool:
        return self._phase == _FAILED

    @property
    def buffered(self) -> int:
        return len(self._buffer) + len(self._tlv)

    def room(self) -> int:
        """How many more bytes to look at: never fewer than one while the header is incomplete."""
        if self._phase == _V1_LINE:
            return V1_MAX - len(self._buffer)
        if self._phase in (_V2_TLVS, _V2_SKIP):
            return min(PEEK_SIZE, self._left)
        if self._phase in (_DONE, _FAILED):
            return 0
        return PEEK_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Take the bytes of `data` that belong to the header; return how many were taken.

        Takes all of `data` while the header is incomplete; fewer only once it
        is `done` (the rest is the client's) or `failed`.
        """
        view = memoryview(data)
        taken = 0
        while taken < len(view) and self._phase < _DONE:
            taken += self._step(view[taken:])
        return taken

    # ------------------------------------------------------------------ steps

    def _step(self, data: memoryview) -> int:
        phase = self._phase
        if phase == _DETECT:
            return self._detect(data)
        if phase == _V1_LINE:
            return self._v1_line(data)
        if phase == _V2_HEAD:
            return self._v2_head(data)
        if phase == _V2_ADDRESSES:
            return self._v2_addresses(data)
        if phase == _V2_TLVS:
            return self._v2_tlvs(data)
        return self._v2_skip(data)

    def _fail(self, reason: str) -> None:
        self._phase = _FAILED
        self.error = reason
        self._buffer.clear()
        self._tlv.clear()

    def _finish(self, header: ProxyHeader) -> None:
        self._phase = _DONE
        self.header = header
        self._buffer.clear()

    def _take(self, data: memoryview, wanted: int) -> int:
        count = min(len(data), wanted - len(self._buffer))
        self._buffer += data[:count]
        return count

    def _detect(self, data: memoryview) -> int:
        count = self._take(data, len(V1_PREFIX))
        seen = bytes(self._buffer)
        if V2_SIGNATURE.startswith(seen):
            if len(seen) == len(V1_PREFIX):
                self._phase = _V2_HEAD
        elif V1_PREFIX.startswith(seen):
            if len(seen) == len(V1_PREFIX):
                self._phase = _V1_LINE
        else:
            self._fail("not a PROXY protocol header")
        return count

    def _v1_line(self, data: memoryview) -> int:
        room = V1_MAX - len(self._buffer)
        end = bytes(data[:room]).find(b"\n")
        if end < 0:
            self._buffer += data[:room]
            if len(self._buffer) >= V1_MAX:
                self._fail(f"v1 header longer than {V1_MAX} bytes")
            return min(len(data), room)
        self._buffer += data[: end + 1]
        header, error = parse_v1(bytes(self._buffer))
        if header is None:
            self._fail(error)
        else:
            self._finish(header)
        return end + 1

    def _v2_head(self, data: memoryview) -> int:
        count = self._take(data, V2_FIXED)
        seen = bytes(self._buffer)
        if not V2_SIGNATURE.startswith(seen[: len(V2_SIGNATURE)]):
            self._fail("not a PROXY protocol header")
        elif len(seen) == V2_FIXED:
            self._v2_start(seen[12], seen[13], int.from_bytes(seen[14:16], "big"))
        return count

    def _v2_start(self, version_command: int, family_transport: int, length: int) -> None:
        """The fixed part is complete: check it and decide what the payload holds."""
        version, command = version_command >> 4, version_command & 0x0F
        family, transport = family_transport >> 4, family_transport & 0x0F
        if version != 2:
            return self._fail(f"v2 header with version {version}")
        if command > 1:
            return self._fail(f"v2 header with unknown command {command}")
        if family > 3 or transport > 2:
            return self._fail(f"v2 header with unknown family/transport 0x{family_transport:02x}")
        size = _V2_ADDRESS_SIZE[family]
        if command == 1 and length < size:
            return self._fail(f"v2 address block of {length} bytes, family {family} needs {size}")
        self._buffer.clear()
        self._left = length
        if command == 0 or family not in (1, 2) or transport != _V2_STREAM:
            self._phase = _V2_SKIP  # no client for us: the connection's own endpoints apply
        else:
            self._address_size = size
            self._phase = _V2_ADDRESSES
        if not length:
            self._finish(ProxyHeader(2, None, None))
        return None

    def _v2_addresses(self, data: memoryview) -> int:
        count = self._take(data, self._address_size)
        if len(self._buffer) == self._address_size:
            self._left -= self._address_size
            block = bytes(self._buffer)
            self._buffer.clear()
            self._addresses = _v2_addresses(block)
            if self._left:
                self._phase = _V2_TLVS
            else:
                self._finish(self._addresses)
        return count

    def _v2_tlvs(self, data: memoryview) -> int:
        """Check and skip TLVs: each must fit in what is left of the header."""
        count = 0
        while count < len(data) and self._left:
            if self._tlv_left:
                skip = min(self._tlv_left, len(data) - count)
                self._tlv_left -= skip
            else:
                skip = min(_TLV_HEAD - len(self._tlv), len(data) - count)
                self._tlv += data[count : count + skip]
                if len(self._tlv) == _TLV_HEAD:
                    self._tlv_left = int.from_bytes(self._tlv[1:3], "big")
                    self._tlv.clear()
                    if self._tlv_left > self._left - skip:
                        self._fail(f"v2 TLV of {self._tlv_left} bytes overruns the header")
                        return count + skip
            count += skip
            self._left -= skip
        if not self._left:
            if self._tlv:
                self._fail("v2 header ends inside a TLV")
            else:
                self._finish(self._addresses)
        return count

    def _v2_skip(self, data: memoryview) -> int:
        skip = min(self._left, len(data))
        self._left -= skip
        if not self._left:
            self._finish(ProxyHeader(2, None, None))
        return skip


def _v2_addresses(block: bytes) -> ProxyHeader:
    if len(block) == 12:
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
        return ProxyHeader(2, (socket.inet_ntop(socket.AF_INET, src), sport),
                           (socket.inet_ntop(socket.AF_INET, dst), dport))  # fmt: skip
    src, dst, sport, dport = struct.unpack("!16s16sHH", block)
    return ProxyHeader(2, (socket.inet_ntop(socket.AF_INET6, src), sport),
                       (socket.inet_ntop(socket.AF_INET6, dst), dport))  # fmt: skip


def parse_v1(line: bytes) -> tuple[ProxyHeader | None, str]:
    """Parse one whole v1 line (with its CRLF): the header, or None and why not."""
    if not line.endswith(b"\r\n"):
        return None, "v1 header does not end with CRLF"
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        return None, "v1 header is not ASCII"
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None), ""
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        return None, "v1 header is not PROXY TCP4|TCP6|UNKNOWN <src> <dst> <sport> <dport>"
    family = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
    try:
        # inet_pton is strict (no leading zeros, no zone); inet_ntop writes an address the way
        # accept() reports one, so a client compares equal whichever way it arrived.
        source = socket.inet_ntop(family, socket.inet_pton(family, parts[2]))
        destination = socket.inet_ntop(family, socket.inet_pton(family, parts[3]))
    except (OSError, ValueError):
        return None, f"v1 header has an address that is not {parts[1]}"
    ports = [_port(p) for p in parts[4:]]
    if ports[0] is None or ports[1] is None:
        return None, "v1 header has a port that is not a number from 0 to 65535"
    return ProxyHeader(1, (source, ports[0]), (destination, ports[1])), ""


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    port = int(text)
    return port if port <= 65535 else None


# ------------------------------------------------------------------ building


def _packed(host: str) -> bytes:
    """An address as 4 or 16 bytes (a socket's IPv6 zone, "%eth0", is dropped)."""
    host = host.partition("%")[0]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host)
    return socket.inet_pton(socket.AF_INET, host)


def _mapped(packed: bytes) -> bytes:
    return packed if len(packed) == 16 else b"\x00" * 10 + b"\xff\xff" + packed


def build_header(version: ProxyVersion, source: HostPort | None, destination: HostPort | None) -> bytes:
    """The header naming `source` → `destination`, or the no-client header if either is unknown.

    Unknown means None or not an IP address (a Unix socket): v1 then sends
    ``PROXY UNKNOWN`` and v2 the LOCAL command, as HAProxy does for health checks.
    """
    try:
        if source is None or destination is None:
            raise ValueError("no address")
        src, dst = _packed(source[0]), _packed(destination[0])
    except (ValueError, OSError):
        return build_local(version)
    if len(src) != len(dst):
        src, dst = _mapped(src), _mapped(dst)
    if version == "v1":
        return _build_v1(src, dst, source[1], destination[1])
    if len(src) == 4:
        return V2_SIGNATURE + struct.pack("!BBH4s4sHH", _V2_PROXY, _V2_TCP4, 12, src, dst,
                                          source[1], destination[1])  # fmt: skip
    return V2_SIGNATURE + struct.pack("!BBH16s16sHH", _V2_PROXY, _V2_TCP6, 36, src, dst,
                                      source[1], destination[1])  # fmt: skip


def _build_v1(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    name = "TCP4" if family == socket.AF_INET else "TCP6"
    text = f"PROXY {name} {socket.inet_ntop(family, src)} {socket.inet_ntop(family, dst)} {sport} {dport}\r\n"
    return text.encode("ascii")


def build_local(version: ProxyVersion) -> bytes:
    """The header that names no client: v1 ``PROXY UNKNOWN``, v2 LOCAL (what health checks send)."""
    if version == "v1":
        return V1_UNKNOWN
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
