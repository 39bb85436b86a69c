"""Single values of a config: durations, rates, sizes, networks, addresses, escaped bytes.

Theory of operation: each `parse_*` function takes a plain value as TOML (or
JSON) gave it and returns a plain value, or raises `ValueError` with the reason
in words an operator can act on. They know nothing of files or key paths: the
caller (`node.py`) wraps the reason into a `ConfigError` naming both. No I/O,
no lookups: a host name is checked for shape (`checks.py`), never resolved.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Final, Literal, final

from trioanubis.config.checks import check_host_name, ip_address_or_none
from trioanubis.config.model import Address, Network, Rate

Kind = Literal["duration", "integer", "size", "bandwidth", "fraction", "rate"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*")
# Up to T: the largest bound, 1TiB, is written so in ranges' texts and must read back.
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}  # fmt: skip
# The largest size or bandwidth a fault accepts: 1 TiB, far beyond any test, small enough
# that arithmetic on it stays exact.
MAX_SIZE = 1 << 40
# The longest duration any key accepts unless its range says otherwise: a day, below
# HAProxy's ceiling for a timeout (2^31-1 ms, 24.8 days) and a round number to remember.
DAY: Final = 86_400.0
# A rate's period ("20/s", "100/10s"): from a millisecond to a day.
RATE_PERIOD: Final = (0.001, DAY)
# Digits a written number's integer part may have: more than any range here needs (1 TiB
# has 13), few enough that reading it as a float is finite. Longer ones are refused unread.
MAX_DIGITS: Final = 15
# The port of a DNS resolver given as a bare address.
DNS_PORT: Final = 53
# What a backslash escape in a health check's send/expect stands for.
_BYTE_ESCAPES: Final = {"r": 0x0D, "n": 0x0A, "t": 0x09, "0": 0x00, "\\": 0x5C, '"': 0x22, "'": 0x27}


@final
@dataclass(frozen=True, slots=True)
class Range:
    """What a numeric key holds and its bounds, both included (`ranges.py` has one per key).

    `kind` says how the value is written and read: a duration (seconds), an
    integer, a size (bytes), a bandwidth (bytes per second), a fraction, or a
    rate (`low` and `high` bound its count; its period is always RATE_PERIOD).
    """

    kind: Kind
    low: float
    high: float

    def describe(self) -> str:
        """"a duration from 0 to 24h": what an error says the value must be."""
        if self.kind == "rate":
            counts, _, periods = self.bounds().partition(" per ")
            return f"a rate of {counts} connections per {periods}"
        noun = {"integer": "an integer", "fraction": "a number"}.get(self.kind, f"a {self.kind}")
        return f"{noun} from {self.bounds()}"

    def bounds(self) -> str:
        """"0 to 24h", "1 to 1024", "0 to 1TiB/s": the range as anubis.toml's comments write it."""
        if self.kind == "duration":
            return f"{show_seconds(self.low)} to {show_seconds(self.high)}"
        if self.kind == "size":
            return f"{show_bytes(self.low)} to {show_bytes(self.high)}"
        if self.kind == "bandwidth":
            least = f"{show_bytes(self.low)}/s" if self.low else "0"
            return f"{least} to {show_bytes(self.high)}/s"
        counts = f"{_plain(self.low)} to {_plain(self.high)}"
        if self.kind == "rate":
            shortest, longest = (show_seconds(s) for s in RATE_PERIOD)
            return f"{counts} per {shortest} to {longest}"
        return counts


def _plain(number: float) -> str:
    """1000000, not 1e+06: a bound as it would be written in the file."""
    return str(int(number)) if number == int(number) else f"{number:g}"


def show_seconds(seconds: float) -> str:
    """A bound as an operator writes it: "0", "1ms", "60s", "24h"."""
    if seconds == 0:
        return "0"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{_plain(seconds / 3600)}h"
    if seconds >= 1 and seconds == int(seconds):
        return f"{_plain(seconds)}s"
    return f"{_plain(seconds * 1000)}ms"


def show_bytes(size: float) -> str:
    """A bound in the largest binary unit that divides it: "0", "4096B", "1MiB", "1TiB"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{_plain(size / scale)}{unit}"
    return f"{_plain(size)}B" if size else "0"


def _too_long(digits: str) -> bool:
    """Whether a written number's integer part has more digits than any range here allows,
    so it is refused as out of range without being converted (a float would overflow)."""
    return len(digits.partition(".")[0]) > MAX_DIGITS


def parse_duration(value: object, low: float = 0.0, high: float = DAY) -> float:
    """Seconds from "250ms", "2s", "1m30s", "1h" or a plain number, from `low` to `high`;
    ValueError otherwise.

    NaN, infinities, negatives and numbers of any size are refused before any
    arithmetic: an int is compared as an int (Python compares it with a float
    exactly), a string's digits are counted before they are read.
    """
    shape = "must be a duration like \"250ms\", \"2s\", \"1m\" or a number of seconds"
    within = Range("duration", low, high)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or value == "":
        raise ValueError(shape)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite duration from {show_seconds(low)} to {show_seconds(high)}")
    seconds = _duration_text(value.strip(), shape) if isinstance(value, str) else value
    if not low <= seconds <= high:
        raise ValueError(f"must be {within.describe()}")
    return float(seconds)


def _duration_text(text: str, shape: str) -> float:
    """The seconds "1m30s" stands for; infinity when a part is too long to be in any range."""
    pos, total = 0, 0.0
    while match := _DURATION_PART.match(text, pos):  # anchored: finditer would be quadratic in digits
        if _too_long(match.group(1)):
            return math.inf
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(shape)
    return total


def parse_integer(value: object, low: int = 0, high: int = 1_000_000) -> int:
    """An integer from `low` to `high` (a float, even 2.0, is refused); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"must be {Range('integer', low, high).describe()}")
    return value


def parse_fraction(value: object, low: float = 0.0, high: float = 1.0) -> float:
    """A number from `low` to `high`, int or float (a probability); ValueError otherwise (NaN
    fails the comparison, a huge int compares exactly)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"must be {Range('fraction', low, high).describe()}")
    return float(value)


def parse_rate(value: object, high: int = 1_000_000) -> Rate:
    """A rate from "20/s", "600/m", "5/h" or "100/10s": a count from 1 to `high` per a period
    within RATE_PERIOD; ValueError otherwise."""
    match = _RATE.fullmatch(value) if isinstance(value, str) else None
    limit = Range("rate", 1, high)
    if match is None:
        raise ValueError(f"must be a rate like \"20/s\", \"600/m\" or \"100/10s\" ({limit.describe()})")
    if _too_long(match.group(1)) or not 1 <= int(match.group(1)) <= high:
        raise ValueError(f"must be {limit.describe()}, like \"20/s\"")
    unit = match.group(2)
    low_period, high_period = RATE_PERIOD
    period = parse_duration(f"1{unit}" if unit in ("s", "m", "h") else unit, 0.0, math.inf)
    if not low_period <= period <= high_period:
        raise ValueError(f"must be {limit.describe()}")
    return Rate(int(match.group(1)), period)


def parse_size(value: object, high: int = MAX_SIZE) -> int:
    """Bytes from "64KB", "1MiB", "512B" or a plain integer, from 0 to `high`; ValueError otherwise.

    KB, MB, GB, TB count in thousands, KiB, MiB, GiB, TiB in 1024s (as `curl` and
    toxiproxy users expect).
    """
    shape = "must be a size like \"512B\", \"64KB\", \"1MiB\" or a number of bytes"
    return _bytes(value, high, shape, Range("size", 0, high))


def parse_bandwidth(value: object, high: int = MAX_SIZE) -> int:
    """Bytes per second from "1MB/s", "512KiB/s" or a plain integer, from 0 to `high`."""
    shape = "must be a bandwidth like \"1MB/s\", \"512KiB/s\" or a number of bytes per second"
    if isinstance(value, str):
        size, slash, unit = value.rpartition("/")
        if not slash or unit.strip() != "s":
            raise ValueError(shape)
        value = size
    return _bytes(value, high, shape, Range("bandwidth", 0, high))


def _bytes(value: object, high: int, shape: str, limit: Range) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(shape)
        too_long = _too_long(match.group(1))
        size = high + 1 if too_long else round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if not 0 <= size <= high:
        raise ValueError(f"must be {limit.describe()}")
    return size


def parse_network(value: object) -> Network:
    """A CIDR ("10.0.0.0/8", "::1/128") or a single address; ValueError with the reason otherwise."""
    if not isinstance(value, str):
        raise ValueError("must be a CIDR string like \"10.0.0.0/8\" or an address")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("must be a CIDR like \"10.0.0.0/8\", \"2001:db8::/32\" or an address") from None
    raise ValueError(f"has bits set beyond its prefix length (did you mean \"{loose}\"?)")


def parse_address(text: str, *, allow_any_host: bool = False) -> Address:
    """Parse "host:port", "[v6]:port" or, for a place to listen, ":port" and port 0.

    Raises ValueError with the reason.
    """
    if not isinstance(text, str):
        raise ValueError("must be a string \"host:port\"")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError("must be \"[ipv6]:port\"")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("must be \"host:port\" (the port is missing)")
        if ":" in host:
            raise ValueError("IPv6 addresses must be written \"[addr]:port\"")
        if host:
            check_host_name(host)
    if not host and not allow_any_host:
        raise ValueError("the host is missing")
    lowest = 0 if allow_any_host else 1  # a listener may ask for any free port with 0
    if not port_text.isdigit() or len(port_text) > 5 or not lowest <= int(port_text) < 65536:
        raise ValueError(f"the port must be a number from {lowest} to 65535")
    return Address(host, int(port_text))


def parse_resolver(text: str) -> Address:
    """A DNS resolver: an IP address, the port optional (53): "10.0.0.2", "[::1]:5353"."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    ip = ip_address_or_none(bare)
    if ip is not None:
        return Address(str(ip), DNS_PORT)
    if ip_address_or_none(text.rpartition(":")[0].strip("[]")) is None:
        raise ValueError('must be an IP address with an optional ":port" (default 53), '
                         'like "10.0.0.2" or "[::1]:5353"; a resolver cannot be a host name')
    return parse_address(text)  # an IP and a port: the port may still be wrong




def decode_escapes(text: str) -> bytes:
    """`text` as bytes: \\r \\n \\t \\0 \\\\ \\xHH decoded, other characters as UTF-8.

    TOML decodes its own escapes in "basic strings" first; this lets 'literal
    strings' and binary bytes (`\\x00`, which TOML 1.0 lacks) through too.
    Raises ValueError naming a bad escape.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode("utf-8", errors="surrogatepass")
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "x":
            digits = text[i + 2 : i + 4]
            if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"\\x must be followed by two hex digits, got {text[i:i + 4]!r}")
            out.append(int(digits, 16))
            i += 4
        elif nxt in _BYTE_ESCAPES and nxt:
            out.append(_BYTE_ESCAPES[nxt])
            i += 2
        else:
            raise ValueError(f"unknown escape {text[i:i + 2]!r} (known: \\r \\n \\t \\0 \\\\ \\xHH)")
    return bytes(out)


def compile_regex(text: str) -> re.Pattern[bytes]:
    """`text` as a bytes regular expression; ValueError with the reason when it is invalid."""
    try:
        return re.compile(text.encode("utf-8", errors="surrogatepass"))
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
