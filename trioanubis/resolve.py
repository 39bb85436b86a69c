"""Turning a configured host name into socket addresses, without blocking the loop."""

from __future__ import annotations

import socket

import trio

from trioanubis.config import Address

SockAddr = tuple[int, tuple[object, ...]]  # (address family, sockaddr)


async def resolve_address(address: Address) -> list[SockAddr]:
    """Every TCP address `address` names, IPv4 first; OSError when it names none.

    Literal IPs are converted in place; names go through Trio's getaddrinfo,
    which runs the libc resolver in a worker thread.
    """
    infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    seen: list[SockAddr] = []
    for family, _, _, _, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        entry = (int(family), tuple(sockaddr))
        if entry not in seen:
            seen.append(entry)
    if not seen:
        raise OSError(f"{address.host!r} has no address")
    return seen
