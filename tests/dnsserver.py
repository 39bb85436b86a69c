"""A small authoritative DNS server for tests, built with dnspython's message API.

Answers A, AAAA and SRV queries over UDP from a dict the test rewrites while
the balancer runs; `silent = True` makes it stop answering (a dead resolver),
`refused = {"AAAA"}` answers REFUSED for that type (as dnsmasq with no upstream
does for a family it has no record of), and `forge` replaces every answer with
whatever bytes it returns for the query (hostile servers, for fuzzing).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio


class Zone:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}  # (name., type) → record texts
        self.ttl = 60
        self.silent = False
        self.queries = 0
        self.refused: set[str] = set()
        self.forge: Callable[[dns.message.Message], bytes] | None = None

    def set(self, name: str, kind: str, *texts: str) -> None:
        self.records[(name.rstrip(".") + ".", kind)] = list(texts)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text()
        kind = dns.rdatatype.to_text(question.rdtype)
        if self.forge is not None:
            return self.forge(query)
        if kind in self.refused:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        texts = self.records.get((name, kind))
        if texts:
            response.answer.append(dns.rrset.from_text(name, self.ttl, "IN", kind, *texts))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            task_status.started(sock.getsockname()[1])
            while True:
                data, peer = await sock.recvfrom(4096)
                self.queries += 1
                if not self.silent:
                    await sock.sendto(self.answer(data), peer)
