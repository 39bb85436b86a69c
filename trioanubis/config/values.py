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
from typing import Final

from trioanubis.config.checks import check_host_name, ip_address_or_none
from trioanubis.config.model import Address, Network, Rate

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*")
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# The largest size or rate a fault accepts: 1 TiB, far beyond any test, small enough
# that arithmetic on it stays exact.
MAX_SIZE = 1 << 40
# The port of a DNS resolver given as a bare address.
DNS_PORT: Final = 53
# What a backslash escape in a health check's send/expect stands for.
_BYTE_ESCAPES: Final = {"r": 0x0D, "n": 0x0A, "t": 0x09, "0": 0x00, "\\": 0x5C, '"': 0x22, "'": 0x27}


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "2s", "1m30s", "1h" or a plain number; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like \"2s\"")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("must be a finite duration")
        if value < 0:
            raise ValueError("must not be negative")
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError("must be a duration like \"250ms\", \"2s\", \"1m\" or a number of seconds")
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError("must be a duration like \"250ms\", \"2s\", \"1m\" or a number of seconds")
    if not math.isfinite(total):
        raise ValueError("must be a finite duration")
    return total


def parse_rate(value: object) -> Rate:
    """A rate from "20/s", "600/m", "5/h" or "100/10s"; ValueError otherwise."""
    match = _RATE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError("must be a rate like \"20/s\", \"600/m\" or \"100/10s\" (a count ≥ 1 per duration)")
    unit = match.group(2)
    period = parse_duration(f"1{unit}" if unit in ("s", "m", "h") else unit)
    if period <= 0:
        raise ValueError("the duration after \"/\" must be greater than zero")
    return Rate(int(match.group(1)), period)


def parse_size(value: object) -> int:
    """Bytes from "64KB", "1MiB", "512B" or a plain integer; ValueError otherwise.

    KB, MB, GB count in thousands, KiB, MiB, GiB in 1024s (as `curl` and
    toxiproxy users expect).
    """
    shape = "must be a size like \"512B\", \"64KB\", \"1MiB\" or a number of bytes"
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(shape)
        size = round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"must be from 0 to {MAX_SIZE} bytes")
    return size


def parse_bandwidth(value: object) -> int:
    """Bytes per second from "1MB/s", "512KiB/s" or a plain integer of bytes per second."""
    shape = "must be a rate like \"1MB/s\", \"512KiB/s\" or a number of bytes per second"
    if isinstance(value, str):
        size, slash, unit = value.rpartition("/")
        if not slash or unit.strip() != "s":
            raise ValueError(shape)
        value = size
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(shape) from None


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
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
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
