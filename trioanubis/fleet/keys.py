"""The fleet's keys and values, sans-IO: where each thing lives under the prefix, and what it says.

Theory of operation: a key under `[cluster] prefix` is one of three kinds
(`parse_key`); anything else under the prefix is not ours and is ignored.
Names are single key segments: a pool, server or instance name with a "/"
(or a "%") in it is written percent-encoded (`segment`), so etcdctl users
write plain names and nothing can reach another pool's keys.

Values are untrusted: any tool with write access to the prefix can put
anything there. `decode_server` and `decode_state` read them with the etcd
client's bounded JSON reader (depth, number length) and then with the same
parsers the config file and the admin use (`parse_server`,
`decode_command`), so a value the balancer takes is one its own file or
admin could have given; everything else is `BadValue`, one line naming the
key. A state value must also match its key (a drain under `.../weight` is
refused), so one key holds one aspect of one server: the last word on that
aspect, which is what a late joiner reads.

    drain   Drain / Enable          weight  SetWeight
    faults  SetFaults / ClearFaults member  AddServer / RemoveServer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from trioanubis.cluster import EtcdBadResponse
from trioanubis.cluster.reading import load_json
from trioanubis.config import ConfigError, ServerConfig, parse_server, show_value
from trioanubis.control import (
    AddServer,
    ClearFaults,
    Command,
    CommandError,
    Drain,
    Enable,
    RemoveServer,
    SetFaults,
    SetWeight,
    decode_command,
    encode_command,
)
from trioanubis.errors import AnubisError

# A value larger than this is refused unread: a server entry or a command is a few hundred bytes.
MAX_VALUE: Final = 16384
ASPECTS: Final[dict[type[Command], str]] = {
    Drain: "drain", Enable: "drain", SetWeight: "weight", SetFaults: "faults", ClearFaults: "faults",
    AddServer: "member", RemoveServer: "member",
}  # fmt: skip


class BadValue(AnubisError):
    """A key's value the fleet cannot take; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerKey:
    pool: str
    name: str


@dataclass(frozen=True, slots=True)
class StateKey:
    pool: str
    server: str
    aspect: str


@dataclass(frozen=True, slots=True)
class MemberKey:
    name: str


Key = ServerKey | StateKey | MemberKey


def segment(name: str) -> str:
    """`name` as one key segment ("/" and "%" percent-encoded, the rest as is)."""
    return quote(name, safe="")


def server_key(prefix: str, pool: str, name: str) -> str:
    return f"{prefix}pools/{segment(pool)}/servers/{segment(name)}"


def state_key(prefix: str, command: Command) -> str:
    return f"{prefix}state/{segment(command.pool)}/{segment(command.server)}/{ASPECTS[type(command)]}"


def member_key(prefix: str, name: str) -> str:
    return f"{prefix}members/{segment(name)}"


def parse_key(prefix: str, raw: bytes) -> Key | None:
    """What a key under `prefix` is; None for a key that is not one of the fleet's."""
    try:
        key = raw.decode()
    except UnicodeDecodeError:
        return None
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if any(not part for part in parts):
        return None
    names = [unquote(part) for part in parts]
    if len(parts) == 4 and parts[0] == "pools" and parts[2] == "servers":
        return ServerKey(names[1], names[3])
    if len(parts) == 4 and parts[0] == "state" and parts[3] in ASPECTS.values():
        return StateKey(names[1], names[2], parts[3])
    if len(parts) == 2 and parts[0] == "members":
        return MemberKey(names[1])
    return None


def load_value(where: str, value: bytes) -> dict[str, object]:
    """The JSON object in a value, bounded; BadValue naming `where` otherwise."""
    if len(value) > MAX_VALUE:
        raise BadValue(f"{where}: a value of {len(value)} bytes (at most {MAX_VALUE})")
    try:
        return load_json(value, where)
    except EtcdBadResponse as exc:
        raise BadValue(str(exc).replace("the answer", "the value")) from None


def decode_server(prefix: str, key: ServerKey, value: bytes) -> ServerConfig:
    """A server entry from `{prefix}pools/{pool}/servers/{name}`; its name is the key's."""
    where = server_key(prefix, key.pool, key.name)
    data = load_value(where, value)
    if data.get("name", key.name) != key.name:
        raise BadValue(f"{where}: name {show_value(data.get('name'))} is not the key's {key.name!r}")
    try:
        return parse_server({**data, "name": key.name}, f"pools.{key.pool}.servers[{key.name}]", where)
    except ConfigError as exc:
        raise BadValue(str(exc)) from None


def decode_state(prefix: str, key: StateKey, value: bytes) -> Command:
    """The command a state key holds; it must be of the key's pool, server and aspect."""
    where = f"{prefix}state/{segment(key.pool)}/{segment(key.server)}/{key.aspect}"
    try:
        command = decode_command(load_value(where, value))
    except CommandError as exc:
        raise BadValue(f"{where}: {exc}") from None
    if (command.pool, command.server, ASPECTS[type(command)]) != (key.pool, key.server, key.aspect):
        raise BadValue(f"{where}: holds {command.op} of pool {show_value(command.pool)} server "
                       f"{show_value(command.server)}, not this key's")  # fmt: skip
    return command


def encode_state(command: Command) -> bytes:
    return json.dumps(encode_command(command), separators=(",", ":")).encode()
