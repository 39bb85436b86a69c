"""The operator's runtime changes: typed commands, their wire form, and the one place they apply.

Theory of operation: every change an operator can make at runtime (drain,
enable, a weight, faults set or cleared, a server added or removed) is one
frozen command. A command checks itself when it is built, with the config's
own validators and ranges (`__post_init__`), so whoever holds one can trust
it: the admin's routes build them from requests (admin.py), the embedding
API from Python, `decode_command` from JSON. `encode_command` and
`decode_command` are the wire form, for a worker's channel message and the
state file; the decoder raises one error, `CommandError`, whatever it is fed.

`Control` applies commands (`apply`) through `Pool` methods only (pool.py
stays the single writer of server state) and keeps what the operator's word
still decides, per server: added or removed at runtime, drained,
re-weighted, faulted. `in_effect` gives that back as commands, which
rebuild the same state on a fresh balancer from the same config: a worker
that starts gets them before it serves (workers/), and the state file keeps
them across restarts (state_file.py). Every process applies the same
commands in the same order through this one function, so the supervisor's
view and every worker agree.

A reload meets the record in `reconcile`: the file's word wins where it says
something new about a server, compared with the previous file. A weight or a
fault table the file changed replaces the operator's; an entry the file
added, removed or changed hands a runtime-added or runtime-removed server of
that name back to the file (reload.py `update_servers` keeps the other
names out of its diff). A reload of an unchanged file keeps every runtime
server, removal, drain, weight and fault table. Changes to servers that
discovery or the spawner own are applied but not recorded: those servers
come and go with their owner.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, final

from trioanubis.config import (
    FAULT_KEYS,
    MAX_WEIGHT,
    ConfigError,
    FaultConfig,
    PoolConfig,
    ServerConfig,
    parse_faults,
    parse_integer,
    parse_server,
    show_value,
)
from trioanubis.errors import AnubisError
from trioanubis.pool import Pool, Server
from trioanubis.resolve import SockAddr

log = logging.getLogger("trioanubis.control")

# Server.source of a server added at runtime (static servers have "", discovery its entry, spawn "spawn").
RUNTIME_SOURCE: Final = "admin"
# No faults at all, not even the pool's: what clearing a server's faults sets.
NO_FAULTS: Final = FaultConfig()
# Servers added at runtime that one pool may hold: far beyond a real pool (discovery caps an
# answer at 1024 too), small enough that a loop of requests cannot grow one without bound.
MAX_ADDED: Final = 1024


class CommandError(AnubisError):
    """A command that is malformed (400), names what does not exist (404) or conflicts (409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise CommandError(f"{what} must be a non-empty string, got {show_value(value)}")
    return value


def _listed(names: Iterable[str], most: int = 20) -> str:
    """What exists, for an error naming what does not: "a, b, c" (the first `most`), or "none"."""
    names = sorted(names)
    shown = ", ".join(names[:most]) + (f", … ({len(names)} in all)" if len(names) > most else "")
    return shown or "none"


def new_server_path(pool: str) -> str:
    """Where errors in a server entry for `pool` say it is: "pools.web.servers[new]" (a long name cut)."""
    shown = pool if len(pool) <= 64 else f"{pool[:48]}...{pool[-13:]}"
    return f"pools.{shown}.servers[new]"


def fault_table(faults: FaultConfig) -> dict[str, Any]:
    """`faults` as a faults table (the keys that differ from the defaults), parsed back to the same."""
    return {key: value for key in FAULT_KEYS if (value := getattr(faults, key)) != getattr(NO_FAULTS, key)}


def server_table(entry: ServerConfig) -> dict[str, Any]:
    """`entry` as a server table of the file, parsed back to the same."""
    table: dict[str, Any] = {"address": str(entry.address), "name": entry.name, "weight": entry.weight,
                             "max_connections": entry.max_connections,
                             "priority": entry.priority}  # fmt: skip
    if entry.send_proxy:
        table["send_proxy"] = entry.send_proxy
    if entry.faults is not None:
        table["faults"] = fault_table(entry.faults)
    return table


def checked_faults(faults: object) -> FaultConfig:
    """`faults` if the config's parser gives it back unchanged (its ranges hold); CommandError otherwise."""
    if not isinstance(faults, FaultConfig):
        raise CommandError(f"faults must be a FaultConfig, got {type(faults).__name__}")
    try:
        if parse_faults(fault_table(faults)) == faults:
            return faults
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    raise CommandError("faults: not a table the config accepts")  # a NaN, say


def checked_entry(pool: str, entry: object) -> ServerConfig:
    """`entry` if the config's server-entry parser gives it back unchanged; CommandError otherwise."""
    if not isinstance(entry, ServerConfig):
        raise CommandError(f"a server entry must be a ServerConfig, got {type(entry).__name__}")
    try:
        if parse_server(server_table(entry), new_server_path(pool)) == entry:
            return entry
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    raise CommandError(f"{new_server_path(pool)}: not an entry the config accepts")


# ------------------------------------------------------------------ commands


@dataclass(frozen=True, slots=True)
class _OnServer:
    pool: str
    server: str  # its name, or its address as written ("host:port")

    def __post_init__(self) -> None:
        _name(self.pool, "pool")
        _name(self.server, "server")


@final
@dataclass(frozen=True, slots=True)
class Drain(_OnServer):
    """No new connections to the server; open ones go on."""

    op: ClassVar[str] = "drain"


@final
@dataclass(frozen=True, slots=True)
class Enable(_OnServer):
    """Back in rotation after a drain."""

    op: ClassVar[str] = "enable"


@final
@dataclass(frozen=True, slots=True)
class SetWeight(_OnServer):
    """A new weight (0 to MAX_WEIGHT), the file's until a reload changes it there."""

    weight: int = 1
    op: ClassVar[str] = "weight"

    def __post_init__(self) -> None:
        _OnServer.__post_init__(self)
        try:
            parse_integer(self.weight, 0, MAX_WEIGHT)
        except ValueError as exc:
            raise CommandError(f"weight {exc}, got {show_value(self.weight)}") from None


@final
@dataclass(frozen=True, slots=True)
class SetFaults(_OnServer):
    """The server's own faults, in place of the pool's (new connections only)."""

    faults: FaultConfig = NO_FAULTS
    op: ClassVar[str] = "faults"

    def __post_init__(self) -> None:
        _OnServer.__post_init__(self)
        checked_faults(self.faults)


@final
@dataclass(frozen=True, slots=True)
class ClearFaults(_OnServer):
    """No faults on the server, not even the pool's (new connections only)."""

    op: ClassVar[str] = "clear_faults"


@final
@dataclass(frozen=True, slots=True)
class AddServer:
    """A new server in a pool, shaped as a server entry of the file."""

    pool: str
    entry: ServerConfig
    op: ClassVar[str] = "add"

    def __post_init__(self) -> None:
        checked_entry(_name(self.pool, "pool"), self.entry)

    @property
    def server(self) -> str:
        return self.entry.name


@final
@dataclass(frozen=True, slots=True)
class RemoveServer(_OnServer):
    """The server takes no new connections and leaves the pool once its open ones end."""

    op: ClassVar[str] = "remove"


Command = Drain | Enable | SetWeight | SetFaults | ClearFaults | AddServer | RemoveServer
COMMANDS: Final[tuple[type[Command], ...]] = (Drain, Enable, SetWeight, SetFaults, ClearFaults, AddServer,
                                               RemoveServer)  # fmt: skip
_BY_OP: Final = {kind.op: kind for kind in COMMANDS}
# The keys each command's JSON object has besides "op" and "pool".
_KEYS: Final = {SetWeight: ("server", "weight"), SetFaults: ("server", "faults")}


def named(command: Command, name: str) -> Command:
    """`command` naming its server by `name` (an address given in a path becomes the server's name)."""
    return command if isinstance(command, AddServer) else dataclasses.replace(command, server=name)


def encode_command(command: Command) -> dict[str, Any]:
    """`command` as a JSON object (a worker's channel message, the state file)."""
    out: dict[str, Any] = {"op": command.op, "pool": command.pool}
    if isinstance(command, AddServer):
        out["server"] = server_table(command.entry)
    else:
        out["server"] = command.server
    if isinstance(command, SetWeight):
        out["weight"] = command.weight
    elif isinstance(command, SetFaults):
        out["faults"] = fault_table(command.faults)
    return out


def decode_command(data: object) -> Command:
    """The command a JSON object stands for, checked as the admin's are; CommandError otherwise."""
    if not isinstance(data, dict):
        raise CommandError(f"a command must be a JSON object, got {show_value(data)}")
    op = data.get("op")
    kind = _BY_OP.get(op) if isinstance(op, str) else None
    if kind is None:
        raise CommandError(f"unknown command {show_value(op)} (known: {', '.join(_BY_OP)})")
    extra = set(data) - {"op", "pool", *_KEYS.get(kind, ("server",))}
    if extra:
        raise CommandError(f"{op}: unknown key {show_value(sorted(map(str, extra))[0])}")
    pool = _name(data.get("pool"), "pool")
    if kind is AddServer:
        try:
            entry = parse_server(data.get("server"), new_server_path(pool))
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        return AddServer(pool, entry)
    server = _name(data.get("server"), "server")
    if kind is SetWeight:
        weight: Any = data.get("weight")  # SetWeight checks it
        return SetWeight(pool, server, weight)
    if kind is SetFaults:
        return SetFaults(pool, server, faults_of(data.get("faults")))
    return kind(pool, server)


def faults_of(table: object) -> FaultConfig:
    """A faults table (JSON) as the config reads one; CommandError naming the key otherwise."""
    try:
        return parse_faults(table)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


# ------------------------------------------------------------------ applying


@dataclass(slots=True)
class _Said:
    """What the operator's word decides about one server (None / False: nothing)."""

    added: ServerConfig | None = None  # added at runtime with this entry
    removed: bool = False  # the file's server of this name was removed at runtime
    draining: bool = False
    weight: int | None = None
    faults: FaultConfig | None = None  # NO_FAULTS: cleared

    def forget_server(self) -> None:
        self.draining, self.weight, self.faults = False, None, None

    def empty(self) -> bool:
        return self == _Said()


@final
class Control:
    """Applies commands to a balancer's pools and keeps the ones whose word still holds."""

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.pools = pools  # the balancer's own mapping: a reload adds and removes pools in it
        self._said: dict[tuple[str, str], _Said] = {}  # (pool, server name) → the operator's word
        self.version = 0  # counts changes to the record (the state file is written when it moved)

    def check(self, command: Command) -> Server | None:
        """What `apply` would refuse, refused now (before an added server's name is resolved)."""
        pool = self.pools.get(command.pool)
        if pool is None:
            raise CommandError(f"no pool {show_value(command.pool)} (pools: {_listed(self.pools)})", 404)
        if isinstance(command, AddServer):
            self._check_new(pool, command.entry)
            return None
        server = pool.find(command.server)
        if server is None:
            raise CommandError(f"pool {show_value(pool.name)} has no server {show_value(command.server)} "
                               f"(servers: {_listed(s.name for s in pool.servers)})", 404)  # fmt: skip
        if isinstance(command, RemoveServer) and server.source not in ("", RUNTIME_SOURCE):
            raise CommandError(f"pool {show_value(pool.name)}: server {show_value(server.name)} comes from "
                               f"{server.source}, which adds and removes it; drain it instead",
                               409)  # fmt: skip
        return server

    def _check_new(self, pool: Pool, entry: ServerConfig) -> None:
        if pool.find(entry.name) is not None:
            raise CommandError(f"pool {show_value(pool.name)} already has a server {show_value(entry.name)}",
                               409)  # fmt: skip
        if sum(s.source == RUNTIME_SOURCE for s in pool.servers) >= MAX_ADDED:
            raise CommandError(f"pool {show_value(pool.name)} holds {MAX_ADDED} servers added at runtime "
                               "already; write them into the config file", 409)  # fmt: skip

    def apply(self, command: Command, sockaddrs: list[SockAddr] | None = None) -> Server:
        """Carry `command` out on its pool and record it; the server it concerns.

        `sockaddrs`: what an added server's address resolved to (none: the
        start-up resolution or its first health check finds them). Raises
        CommandError (404, 409) as `check` does.
        """
        found = self.check(command)
        pool = self.pools[command.pool]
        if isinstance(command, AddServer):
            return self._add(pool, command.entry, sockaddrs)
        assert found is not None
        recorded = found.source in ("", RUNTIME_SOURCE)  # discovery's and the spawner's come and go with them
        key = (pool.name, found.name)
        said = self._said.setdefault(key, _Said()) if recorded else _Said()
        self._carry_out(pool, found, command, said)
        if recorded and said.empty():
            del self._said[key]
        self.version += 1
        return found

    def _carry_out(self, pool: Pool, server: Server, command: Command, said: _Said) -> None:
        if isinstance(command, (Drain, Enable)):
            said.draining = isinstance(command, Drain)
            pool.set_draining(server, said.draining)
        elif isinstance(command, SetWeight):
            said.weight = command.weight
            pool.set_weight(server, command.weight)
            log.info("pool %s: server %s weight set to %d", pool.name, server.name, command.weight)
        elif isinstance(command, (SetFaults, ClearFaults)):
            said.faults = command.faults if isinstance(command, SetFaults) else NO_FAULTS
            pool.set_faults(server, said.faults)
            log.info("pool %s: server %s faults %s", pool.name, server.name,
                     f"set to {fault_table(said.faults)}" if said.faults.active else "cleared")  # fmt: skip
        elif isinstance(command, RemoveServer):
            self._remove(pool, server, said)

    def _add(self, pool: Pool, entry: ServerConfig, sockaddrs: list[SockAddr] | None) -> Server:
        server = Server(entry, healthy=pool.config.health.check == "none", source=RUNTIME_SOURCE,
                        sockaddrs=sockaddrs)  # fmt: skip
        pool.add([server])
        self._said.setdefault((pool.name, entry.name), _Said()).added = entry
        self.version += 1
        log.info("pool %s: server %s (%s) added at runtime", pool.name, entry.name, entry.address)
        return server

    def _remove(self, pool: Pool, server: Server, said: _Said) -> None:
        pool.remove(server)
        if said.added is not None:
            said.added = None  # a runtime server leaves no trace (a removed file server of its name stays so)
        else:
            said.removed = True
        said.forget_server()
        log.info("pool %s: server %s removed at runtime (no new connections%s)", pool.name, server.name,
                 f"; {server.active} open go on" if server.active else "")  # fmt: skip

    # ------------------------------------------------------------- the record

    def in_effect(self) -> list[Command]:
        """The commands that rebuild what the operator decided, on a fresh balancer from the same config."""
        return list(self._replay())

    def _replay(self) -> Iterator[Command]:
        for (pool, name), said in self._said.items():
            if said.removed:
                yield RemoveServer(pool, name)
            if said.added is not None:
                yield AddServer(pool, said.added)
            if said.draining:
                yield Drain(pool, name)
            if said.weight is not None:
                yield SetWeight(pool, name, said.weight)
            if said.faults is not None:
                yield SetFaults(pool, name, said.faults) if said.faults.active else ClearFaults(pool, name)

    def members(self, pool: str) -> frozenset[str]:
        """The names in `pool` whose membership the operator decided (added or removed at runtime)."""
        return frozenset(name for (p, name), said in self._said.items()
                         if p == pool and (said.added is not None or said.removed))  # fmt: skip

    def reconcile(self, old: Mapping[str, PoolConfig], new: Mapping[str, PoolConfig]) -> None:
        """A reload from `old` pools to `new`: forget what the new file says anew (module docstring)."""
        for key, said in list(self._said.items()):
            pool, name = key
            before, after = _entry(old.get(pool), name), _entry(new.get(pool), name)
            if pool not in new or (after is None and said.added is None and not said.removed):
                del self._said[key]  # the pool, or the file's server, is gone
            elif before != after:
                self._file_says(pool, name, said, before, after)
                if said.empty():
                    del self._said[key]
            else:
                continue
            self.version += 1

    @staticmethod
    def _file_says(
        pool: str, name: str, said: _Said, before: ServerConfig | None, after: ServerConfig | None
    ) -> None:
        if said.added is not None or said.removed:
            log.info("reload: pool %s: server %s is the config file's again (its entry there changed)",
                     pool, name)  # fmt: skip
        if said.added is not None or after is None:  # the file's entry replaces the operator's, but a drain
            said.weight = said.faults = None
            said.draining = said.draining and after is not None
        else:  # a weight or faults the file changed win (what the operator set survives the rest)
            if before is None or before.weight != after.weight:
                said.weight = None
            if before is None or before.faults != after.faults:
                said.faults = None
        said.added, said.removed = None, False


def _entry(pool: PoolConfig | None, name: str) -> ServerConfig | None:
    """The file's entry for server `name` of `pool`, if it has one."""
    return None if pool is None else next((s for s in pool.servers if s.name == name), None)
