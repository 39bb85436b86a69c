"""Membership, sans-IO: what one instance says of itself, and where the instances disagree.

Theory of operation: each instance keeps one key, `{prefix}members/{name}`,
under a lease (fleet.py renews it; a dead instance's key goes when the lease
runs out). Its value is a `Member`: name, version, process, when it started,
its admin address, and its view of every server (`view_of`: "up" or "down",
health only; a drain is shared state and the same everywhere). The values are
untrusted like any key's (`decode_member`: bounded, typed, at most
`MAX_SERVERS` rows), and one that fails is left out of the list, not fatal.

`disagreements` is what an incident starts with: each (pool, server) that
one instance sees up and another down, with the instances on each side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from trioanubis.config import show_value
from trioanubis.fleet.keys import BadValue, load_value
from trioanubis.pool import Pool

# Server rows one membership value may hold: far above a real fleet's pools, bounding a hostile one.
MAX_SERVERS: Final = 10_000
STATES: Final = ("up", "down")

View = Mapping[str, Mapping[str, str]]  # pool → server → "up" | "down"


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    version: str = ""
    pid: int = 0
    started: float = 0.0  # Unix time
    admin: str = ""  # its admin endpoint, "" without one
    servers: View = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "pid": self.pid, "started": self.started,
                "admin": self.admin, "servers": {p: dict(s) for p, s in self.servers.items()}}  # fmt: skip


def view_of(pools: Mapping[str, Pool]) -> dict[str, dict[str, str]]:
    """How this instance sees its servers: "up" or "down" by health."""
    return {name: {s.name: "up" if s.healthy else "down" for s in pool.servers}
            for name, pool in pools.items()}  # fmt: skip


def encode_member(member: Member) -> bytes:
    return json.dumps(member.document(), separators=(",", ":"), sort_keys=True).encode()


def _text(data: Mapping[str, object], key: str, where: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or len(value) > 256:
        raise BadValue(f"{where}: {key} must be a short string, got {show_value(value)}")
    return value


def _number(data: Mapping[str, object], key: str, where: str) -> float:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**53:
        raise BadValue(f"{where}: {key} must be a number, got {show_value(value)}")
    return float(value)


def _view(raw: object, where: str) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise BadValue(f"{where}: servers must be an object of pools, got {show_value(raw)}")
    out: dict[str, dict[str, str]] = {}
    rows = 0
    for pool, servers in raw.items():
        if not isinstance(servers, dict):
            raise BadValue(f"{where}: servers.{show_value(pool)} must be an object")
        rows += len(servers)
        if rows > MAX_SERVERS:
            raise BadValue(f"{where}: more than {MAX_SERVERS} servers")
        for name, state in servers.items():
            if state not in STATES:
                raise BadValue(f"{where}: servers.{pool}.{name} must be up or down, got {show_value(state)}")
        out[pool] = dict(servers)
    return out


def decode_member(where: str, name: str, value: bytes) -> Member:
    """The membership value of instance `name` (the key's); BadValue naming `where` otherwise."""
    data = load_value(where, value)
    if data.get("name", name) != name:
        raise BadValue(f"{where}: name {show_value(data.get('name'))} is not the key's {name!r}")
    return Member(name, _text(data, "version", where), int(_number(data, "pid", where)),
                  _number(data, "started", where), _text(data, "admin", where),
                  _view(data.get("servers", {}), where))  # fmt: skip


def disagreements(members: Iterable[Member]) -> list[dict[str, Any]]:
    """Each (pool, server) some instances see up and others down: {pool, server, up: [...], down: [...]}."""
    sides: dict[tuple[str, str], dict[str, list[str]]] = {}
    for member in sorted(members, key=lambda m: m.name):
        for pool, servers in member.servers.items():
            for server, state in servers.items():
                sides.setdefault((pool, server), {"up": [], "down": []})[state].append(member.name)
    return [{"pool": pool, "server": server, **seen} for (pool, server), seen in sorted(sides.items())
            if seen["up"] and seen["down"]]  # fmt: skip


def fleet_document(members: Iterable[Member], **about: Any) -> dict[str, Any]:
    """The `/fleet` answer and `anubis fleet --json`: the instances, where they disagree, and `about`
    (which instance answers, whether it reaches etcd)."""
    listed = sorted(members, key=lambda m: m.name)
    return {**about, "instances": [m.document() for m in listed], "disagreements": disagreements(listed)}
