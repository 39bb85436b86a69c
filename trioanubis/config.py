"""Configuration: TOML text → frozen, typed records.

Theory of operation: `load_config` reads a file, `parse_config` turns a TOML
mapping into a `Config`. Both are pure apart from reading the file; nothing
here resolves names or opens sockets. Every rejection is a `ConfigError` whose
message has the shape ``FILE: KEY.PATH: what is wrong, got VALUE`` so the
operator can find the line without a traceback. Unknown keys are rejected with
a did-you-mean suggestion, because a misspelt timeout silently falling back to
its default is the worst kind of config bug.

The schema is a contract: keys are added, never renamed.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trioanubis.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

HealthCheck = Literal["tcp", "http", "none"]
LeastTimeMode = Literal["first_byte", "connect"]
LogFormat = Literal["text", "json"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Address:
    """A host (name or literal IP, "" meaning every interface) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: Address
    name: str
    weight: int = 1
    max_connections: int = 0  # 0: unlimited


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Servers that come from DNS: A/AAAA records of `name` (kind "dns") or SRV records."""

    kind: Literal["dns", "srv"]
    name: str
    port: int  # for "dns"; SRV records carry their own
    refresh: float
    weight: int = 1
    max_connections: int = 0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    check: HealthCheck = "tcp"
    path: str = "/health"
    host: str = ""  # Host header; "" means the server's own host
    expect_status: int = 200
    expect_body: str = ""
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    slow_start: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    discovery: tuple[DiscoveryConfig, ...] = ()
    strategy: str = "round_robin"
    least_time: LeastTimeMode = "first_byte"
    connect_timeout: float = 3.0
    idle_timeout: float = 600.0
    half_close_timeout: float = 60.0
    retries: int = 2
    failover_timeout: float = 0.0  # 0: unbounded (each attempt still has connect_timeout)
    eject_after: int = 3
    eject_for: float = 10.0
    resolver: str = ""
    health: HealthConfig = field(default_factory=HealthConfig)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str
    max_connections: int = 0  # 0: only the process-wide limit applies
    backlog: int = 0  # 0: the kernel's somaxconn


@dataclass(frozen=True, slots=True)
class AdminConfig:
    bind: Address
    token: str = ""  # from `token`, or read from `token_file` (each load, so a reload rotates it)
    token_file: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    drain_timeout: float = 30.0
    log_format: LogFormat = "text"
    access_log: bool = True
    pid_file: str = ""
    resolver: str = ""
    max_connections: int = 0  # 0: derived from the file-descriptor limit
    workers: int = 1  # processes serving connections; 0: "auto", one per usable core


@dataclass(frozen=True, slots=True)
class Config:
    listeners: Mapping[str, ListenerConfig]
    pools: Mapping[str, PoolConfig]
    settings: Settings = field(default_factory=Settings)
    admin: AdminConfig | None = None
    source: str = "<config>"


# --------------------------------------------------------------------- values


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "2s", "1m30s", "1h" or a plain number; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like \"2s\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
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
    return total


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
    if not host and not allow_any_host:
        raise ValueError("the host is missing")
    lowest = 0 if allow_any_host else 1  # a listener may ask for any free port with 0
    if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
        raise ValueError(f"the port must be a number from {lowest} to 65535")
    return Address(host, int(port_text))


# ------------------------------------------------------------------- reading


class _Node:
    """A TOML table being validated; remembers its key path for error messages."""

    def __init__(self, data: object, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, Mapping):
            raise self.error("must be a table", data)
        self.data: Mapping[str, Any] = data

    def error(self, message: str, value: object = None, key: str | None = None) -> ConfigError:
        where = self.key_path(key) if key is not None else self.path
        got = "" if value is None else f", got {_show(value)}"
        return ConfigError(f"{self.source}: {where or '(top level)'}: {message}{got}")

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known_list = ", ".join(known)
                raise ConfigError(
                    f"{self.source}: {self.key_path(key)}: unknown key{hint}; "
                    f"known keys here: {known_list}"
                )

    def child(self, key: str) -> _Node:
        return _Node(self.data.get(key, {}), self.key_path(key), self.source)

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise self.error("must be a string", value, key)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(f"must be one of {', '.join(map(repr, choices))}", value, key)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error("must be true or false", value, key)
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"≥ {minimum}"
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            raise self.error(f"must be an integer {bound}", value, key)
        return int(value)

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.data.get(key, default)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None
        if positive and seconds <= 0:
            raise self.error("must be greater than zero", value, key)
        return seconds

    def address(self, key: str, *, allow_any_host: bool = False, default: str = "") -> Address:
        if key not in self.data and not default:
            raise self.error("is required (\"host:port\")", key=key)
        value = self.data.get(key, default)
        try:
            return parse_address(value, allow_any_host=allow_any_host)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None


def _show(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every failure is a ConfigError naming the file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    return parse_config_text(raw.decode("utf-8", errors="replace"), source)


def parse_config_text(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a TOML mapping and build the frozen config records."""
    top = _Node(data, "", source)
    top.check_keys(("settings", "listeners", "pools", "admin"))
    settings = _parse_settings(top.child("settings"))
    pools_node = top.child("pools")
    pools = {name: _parse_pool(name, pools_node.child(name)) for name in pools_node.data}
    listeners_node = top.child("listeners")
    if not listeners_node.data:
        raise top.error("at least one [listeners.NAME] table is required")
    listeners = {}
    for name in listeners_node.data:
        listener = _parse_listener(name, listeners_node.child(name))
        if listener.pool not in pools:
            known = ", ".join(sorted(pools)) or "none are defined"
            raise listeners_node.error(
                f"names pool {listener.pool!r}, which does not exist (pools: {known})",
                key=f"{name}.pool",
            )
        listeners[name] = listener
    _check_unique_binds(listeners_node, listeners)
    admin = _parse_admin(top.child("admin")) if "admin" in data else None
    return Config(listeners, pools, settings, admin, source)


def _parse_settings(node: _Node) -> Settings:
    node.check_keys(
        ("drain_timeout", "log_format", "access_log", "pid_file", "resolver", "max_connections",
         "workers")
    )
    return Settings(
        drain_timeout=node.duration("drain_timeout", 30.0),
        log_format=node.choice("log_format", "text", ("text", "json")),  # type: ignore[arg-type]
        access_log=node.boolean("access_log", True),
        pid_file=node.string("pid_file", ""),
        resolver=_resolver(node),
        max_connections=node.integer("max_connections", 0),
        workers=_workers(node),
    )


# More worker processes than this is a typo, not a machine.
MAX_WORKERS = 1024


def _workers(node: _Node) -> int:
    """`workers`: a count from 1 to MAX_WORKERS, or "auto" (stored as 0, resolved at run time)."""
    if node.data.get("workers") == "auto":
        return 0
    if isinstance(node.data.get("workers"), str):
        value = node.data["workers"]
        raise node.error(f'must be "auto" or an integer from 1 to {MAX_WORKERS}', value, "workers")
    return node.integer("workers", 1, minimum=1, maximum=MAX_WORKERS)


def _resolver(node: _Node) -> str:
    value = node.string("resolver", "")
    if value:
        try:
            parse_address(value)
        except ValueError as exc:
            raise node.error(str(exc), value, "resolver") from None
    return value


def _parse_listener(name: str, node: _Node) -> ListenerConfig:
    node.check_keys(("bind", "pool", "max_connections", "backlog"))
    if "pool" not in node.data:
        raise node.error("is required (the name of a [pools.NAME] table)", key="pool")
    return ListenerConfig(
        name=name,
        bind=node.address("bind", allow_any_host=True),
        pool=node.string("pool", ""),
        max_connections=node.integer("max_connections", 0),
        backlog=node.integer("backlog", 0, maximum=65535),
    )


def _check_unique_binds(node: _Node, listeners: Mapping[str, ListenerConfig]) -> None:
    seen: dict[Address, str] = {}
    for name, listener in listeners.items():
        if listener.bind.port == 0:  # "any free port" never collides
            continue
        if listener.bind in seen:
            raise node.error(
                f"binds {listener.bind}, which listener {seen[listener.bind]!r} binds already",
                str(listener.bind),
                key=f"{name}.bind",
            )
        seen[listener.bind] = name


# Visible ASCII: what an Authorization header can carry; anything else never matches.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# A token file bigger than this is the wrong file.
MAX_TOKEN_BYTES = 4096


def _parse_admin(node: _Node) -> AdminConfig:
    node.check_keys(("bind", "token", "token_file"))
    token, token_file = node.string("token", ""), node.string("token_file", "")
    if token and token_file:
        raise node.error("set token or token_file, not both", key="token_file")
    if token_file:
        token = _read_token(node, token_file)
    elif token and not _TOKEN.fullmatch(token):
        raise node.error("must be visible ASCII characters, no spaces", key="token")  # never echo it
    return AdminConfig(
        bind=node.address("bind", allow_any_host=True, default="127.0.0.1:9900"),
        token=token,
        token_file=token_file,
    )


def _read_token(node: _Node, path: str) -> str:
    """The token in `path` (a mounted Kubernetes Secret, say), surrounding whitespace removed."""
    try:
        if not Path(path).is_file():
            raise node.error("must name a readable regular file", path, "token_file")
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise node.error(f"cannot read it: {exc.strerror or exc}", path, "token_file") from None
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_TOKEN_BYTES or not _TOKEN.fullmatch(token):
        raise node.error(f"must hold one token of visible ASCII characters (at most {MAX_TOKEN_BYTES} "
                         "bytes)", path, "token_file")  # fmt: skip
    return token


_POOL_KEYS = (
    "strategy", "servers", "least_time", "connect_timeout", "idle_timeout",
    "half_close_timeout", "retries", "failover_timeout", "eject_after", "eject_for",
    "resolver", "health",
)  # fmt: skip


def _parse_pool(name: str, node: _Node) -> PoolConfig:
    node.check_keys(_POOL_KEYS)
    strategy = node.string("strategy", "round_robin")
    from trioanubis.strategies import StrategyError, resolve_strategy

    try:
        resolve_strategy(strategy)
    except StrategyError as exc:
        raise node.error(str(exc), strategy, "strategy") from None
    servers, discovery = _parse_servers(node)
    return PoolConfig(
        name=name,
        servers=servers,
        discovery=discovery,
        strategy=strategy,
        least_time=node.choice("least_time", "first_byte", ("first_byte", "connect")),  # type: ignore[arg-type]
        connect_timeout=node.duration("connect_timeout", 3.0, positive=True),
        idle_timeout=node.duration("idle_timeout", 600.0, positive=True),
        half_close_timeout=node.duration("half_close_timeout", 60.0, positive=True),
        retries=node.integer("retries", 2, maximum=100),
        failover_timeout=node.duration("failover_timeout", 0.0),
        eject_after=node.integer("eject_after", 3),
        eject_for=node.duration("eject_for", 10.0, positive=True),
        resolver=_resolver(node),
        health=_parse_health(node.child("health")),
    )


def _parse_servers(node: _Node) -> tuple[tuple[ServerConfig, ...], tuple[DiscoveryConfig, ...]]:
    entries = node.data.get("servers")
    if not isinstance(entries, list) or not entries:
        raise node.error("must be a non-empty array of servers", entries, "servers")
    servers: list[ServerConfig] = []
    discovery: list[DiscoveryConfig] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        path = node.key_path(f"servers[{index}]")
        if isinstance(entry, str):
            entry = {"address": entry}
        item = _Node(entry, path, node.source)
        if "dns" in item.data or "srv" in item.data:
            discovery.append(_parse_discovery(item))
            continue
        item.check_keys(("address", "weight", "name", "max_connections"))
        address = item.address("address")
        server = ServerConfig(
            address=address,
            name=item.string("name", "") or str(address),
            weight=item.integer("weight", 1, maximum=1_000_000),
            max_connections=item.integer("max_connections", 0),
        )
        if server.name in names:
            raise item.error("duplicate server name in this pool", server.name, "name")
        names.add(server.name)
        servers.append(server)
    return tuple(servers), tuple(discovery)


def _parse_discovery(item: _Node) -> DiscoveryConfig:
    item.check_keys(("dns", "srv", "refresh", "weight", "max_connections"))
    if "dns" in item.data and "srv" in item.data:
        raise item.error("give either dns or srv, not both")
    refresh = item.duration("refresh", 10.0, positive=True)
    weight = item.integer("weight", 1, maximum=1_000_000)
    max_connections = item.integer("max_connections", 0)
    if "srv" in item.data:
        name = item.string("srv", "")
        if not name:
            raise item.error("must be a DNS name like \"_http._tcp.example\"", name, "srv")
        return DiscoveryConfig("srv", name, 0, refresh, weight, max_connections)
    address = item.address("dns")
    return DiscoveryConfig("dns", address.host, address.port, refresh, weight, max_connections)


def _parse_health(node: _Node) -> HealthConfig:
    node.check_keys(
        ("check", "path", "host", "expect_status", "expect_body", "interval", "timeout",
         "rise", "fall", "slow_start")
    )  # fmt: skip
    path = node.string("path", "/health")
    if not path.startswith("/"):
        raise node.error("must start with \"/\"", path, "path")
    return HealthConfig(
        check=node.choice("check", "tcp", ("tcp", "http", "none")),  # type: ignore[arg-type]
        path=path,
        host=node.string("host", ""),
        expect_status=node.integer("expect_status", 200, minimum=100, maximum=599),
        expect_body=node.string("expect_body", ""),
        interval=node.duration("interval", 2.0, positive=True),
        timeout=node.duration("timeout", 1.0, positive=True),
        rise=node.integer("rise", 2, minimum=1, maximum=1000),
        fall=node.integer("fall", 3, minimum=1, maximum=1000),
        slow_start=node.duration("slow_start", 0.0),
    )


def proxy_config(listen: str, servers: list[str], strategy: str) -> Config:
    """The config `anubis proxy LISTEN SERVER...` stands for; errors name the argument."""
    data = {
        "listeners": {"proxy": {"bind": listen, "pool": "proxy"}},
        "pools": {"proxy": {"strategy": strategy, "servers": servers, "health": {"check": "tcp"}}},
    }
    return parse_config(data, "anubis proxy")
