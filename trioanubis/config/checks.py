"""Value checks that keep `run` and a reload from failing on what `check` accepted.

Theory of operation: the section parsers know the shape of the file (which keys,
which types); this module knows what the layers underneath will do with a value and
refuses, up front, whatever they would choke on later:

- a host name goes to `getaddrinfo`, which encodes it with Python's IDNA codec
  (ASCII names) or the `idna` package (others, as Trio does) and raises
  `UnicodeError`, not `OSError`, for an empty label or one over 63 characters;
  dnspython refuses the same names with its own exceptions;
- a health check's `path` and `host` go into an HTTP/1.1 request head that h11
  builds only from visible ASCII (RFC 7230 `request-target`, `Host`);
- two listening sockets on one port collide when their addresses overlap
  (`0.0.0.0` covers every IPv4 address, `[::]` is dual-stack and covers both
  families), which `run` would only report as "Address already in use";
- an SNI route's pattern is matched label by label (`proxy/sni_routes.py`),
  so it must be a DNS name or one leading "*." wildcard.

Everything here is pure, plain values in and a `ValueError` with the reason
out, but for one lookup: "localhost" is compared as the address it resolves
to (once per process, from the hosts file), since a bind to it listens there.
Any other host name is compared by its text.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Final

import idna

# RFC 1035 §2.3.4: 63 octets a label, 255 a name on the wire (253 as text).
MAX_LABEL: Final = 63
MAX_NAME: Final = 253

# Letters, digits, hyphen, and the underscore SRV names and some container
# platforms use; anything else getaddrinfo cannot look up in DNS anyway.
_ASCII_LABEL: Final = re.compile(r"[A-Za-z0-9_-]+")
# RFC 7230 request-target as h11 accepts it: visible ASCII, no space.
_VISIBLE_ASCII: Final = re.compile(r"[\x21-\x7e]+")
# An SNI pattern: a DNS name, or "*." followed by one (letters, digits, "-", "_"; labels of 1-63).
_SNI_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_SNI_PATTERN: Final = re.compile(rf"(?:\*\.)?{_SNI_LABEL}(?:\.{_SNI_LABEL})*")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def check_host_name(host: str) -> None:
    """Accept an IP literal or a DNS name every resolver we use can take; ValueError otherwise."""
    if ip_address_or_none(host) is not None:
        return
    try:
        ascii_name = host.encode("ascii").decode()
    except UnicodeEncodeError:
        try:
            ascii_name = idna.encode(host, uts46=True).decode()
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"{host!r} is not a valid international host name ({exc})") from None
    _check_ascii_name(ascii_name)


def _check_ascii_name(name: str) -> None:
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > MAX_NAME:
        raise ValueError(f"a host name has 1 to {MAX_NAME} characters")
    for label in bare.split("."):
        if not label:
            raise ValueError(f"{name!r} is not a valid host name (empty label)")
        if len(label) > MAX_LABEL:
            raise ValueError(f"{name!r} is not a valid host name "
                             f"(a label is longer than {MAX_LABEL} characters)")  # fmt: skip
        if not _ASCII_LABEL.fullmatch(label):
            raise ValueError(f"{name!r} is not a valid host name "
                             "(letters, digits, '-', '_' and '.' only)")  # fmt: skip


def check_pattern(pattern: str) -> str:
    """An SNI route's pattern in lower case; ValueError saying what is wrong with it otherwise."""
    lowered = pattern.strip().lower().removesuffix(".")
    if len(lowered) > MAX_NAME or not _SNI_PATTERN.fullmatch(lowered):
        raise ValueError("must be a DNS name like \"api.example.com\" or a wildcard like \"*.example.com\" "
                         "(\"*.\" only as the first label)")  # fmt: skip
    return lowered


def check_header_path(path: str) -> None:
    """An HTTP request target: starts with "/", visible ASCII only (no space, CR or LF)."""
    if not path.startswith("/"):
        raise ValueError('must start with "/"')
    if not _VISIBLE_ASCII.fullmatch(path):
        raise ValueError("must be visible ASCII without spaces (percent-encode the rest)")


def check_header_host(host: str) -> None:
    """A Host header value: host[:port] with an ASCII host name, IPv4 or [IPv6]."""
    if host.startswith("["):
        literal, close, rest = host[1:].partition("]")
        if not close or not _is_ipv6(literal) or (rest and not rest.startswith(":")):
            raise ValueError('an IPv6 host is written "[addr]" or "[addr]:port"')
        port = rest[1:] if rest else None
    else:
        if not host.isascii():
            raise ValueError("must be ASCII (write an international name in its xn-- form)")
        name, colon, port_text = host.partition(":")
        _check_ascii_name(name)
        port = port_text if colon else None
    if port is not None and not _is_port(port):
        raise ValueError("the port must be a number from 1 to 65535")


def _is_port(text: str) -> bool:
    return text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def ip_address_or_none(host: str) -> IPAddress | None:
    """`host` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ------------------------------------------------------------------- binds


def find_bind_overlap(binds: Iterable[tuple[str, str, int]]) -> tuple[str, str, str] | None:
    """The first two of `(who, host, port)` that cannot both listen, and why; None if all can.

    `host` "" means every IPv4 interface (as the listeners bind it); port 0
    (any free port) never collides.
    """
    seen: list[tuple[str, str, int]] = []
    for who, host, port in binds:
        if port == 0:
            continue
        for other, other_host, other_port in seen:
            why = _overlap(host, other_host) if other_port == port else None
            if why is not None:
                return other, who, why
        seen.append((who, host, port))
    return None


def _overlap(a: str, b: str) -> str | None:
    """Why listening on hosts `a` and `b` (one port) collides, or None."""
    ip_a, ip_b = listen_ip(a), listen_ip(b)
    wildcards = [ip for ip in (ip_a, ip_b) if ip is not None and ip.is_unspecified]
    if ip_a is None or ip_b is None:  # a name: the same name, or a wildcard covers it
        if a.lower().rstrip(".") == b.lower().rstrip("."):
            return "the same host"
        return _WILDCARD[wildcards[0].version] if wildcards else None
    if ip_a == ip_b:
        return "the same address"
    for wide, narrow in ((ip_a, ip_b), (ip_b, ip_a)):
        if wide.is_unspecified and (wide.version == 6 or narrow.version == 4):
            return _WILDCARD[wide.version]
    return None


@functools.cache
def _localhost() -> str | None:
    """What "localhost" resolves to first, looked up once per process (the hosts file)."""
    with contextlib.suppress(OSError, IndexError):
        return str(socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0])
    return None


_WILDCARD: Final = {4: "0.0.0.0 (or \":port\") is every IPv4 address",
                    6: "[::] is every address, IPv4 and IPv6 (dual-stack)"}  # fmt: skip


def listen_ip(host: str) -> IPAddress | None:
    """The address a bind to `host` listens on: an IP as written, "" as 0.0.0.0, "localhost" as the
    address it resolves to first (as the bind resolves it); None for another name, which only the
    bind itself resolves."""
    if host.lower().rstrip(".") == "localhost":
        host = _localhost() or host
    ip = ip_address_or_none(host or "0.0.0.0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
