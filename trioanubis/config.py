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
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trioanubis.errors import ConfigError
from trioanubis.proxy.io import IO_CHOICES, IoName, epoll_available

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

HealthCheck = Literal["tcp", "http", "none"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SendProxy = Literal["none", "v1", "v2"]
LeastTimeMode = Literal["first_byte", "connect"]
LogFormat = Literal["text", "json"]
FaultDirection = Literal["upstream", "downstream", "both"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*")
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# The largest size or rate a fault accepts: 1 TiB, far beyond any test, small enough
# that arithmetic on it stays exact.
MAX_SIZE = 1 << 40


@dataclass(frozen=True, slots=True)
class Address:
    """A host (name or literal IP, "" meaning every interface) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` new connections per `period` seconds, in bursts of up to `count` (a token bucket)."""

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Network faults injected on a server's connections (trioanubis.faults); all zero: none."""

    direction: FaultDirection = "both"
    probability: float = 1.0  # the fraction of connections (or connect attempts, for refuse) affected
    latency: float = 0.0  # every chunk is held this long (seconds) ...
    jitter: float = 0.0  # ... give or take up to this much, order kept
    bandwidth: int = 0  # bytes per second per connection and direction; 0: unlimited
    reset_after: int = 0  # bytes, then a TCP reset; 0: never
    close_after: int = 0  # bytes, then a clean close (FIN); 0: never
    blackhole: bool = False  # read and drop, send nothing
    refuse: bool = False  # connects fail as if refused
    slice: int = 0  # deliver in segments of at most this many bytes; 0: whole chunks
    slice_delay: float = 0.0  # the pause between two segments

    @property
    def active(self) -> bool:
        """Whether any fault is set (direction and probability alone do nothing)."""
        return bool(self.latency or self.jitter or self.bandwidth or self.reset_after or self.close_after
                    or self.blackhole or self.refuse or self.slice)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: Address
    name: str
    weight: int = 1
    max_connections: int = 0  # 0: unlimited
    send_proxy: SendProxy | Literal[""] = ""  # "": the pool's
    faults: FaultConfig | None = None  # None: the pool's


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
    send_proxy: bool = False  # checks send a PROXY header (UNKNOWN / LOCAL) when the server gets one


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
    send_proxy: SendProxy = "none"  # a PROXY protocol header before the client's first byte
    faults: FaultConfig | None = None  # injected on every server's connections (trioanubis.faults)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str
    max_connections: int = 0  # 0: only the process-wide limit applies
    backlog: int = 0  # 0: the kernel's somaxconn
    accept_proxy: bool = False  # read a PROXY protocol header from every client first
    proxy_trusted: tuple[Network, ...] = ()  # the peers allowed to send one (required with accept_proxy)
    proxy_timeout: float = 3.0
    allow: tuple[Network, ...] = ()  # empty: every client
    deny: tuple[Network, ...] = ()  # wins over allow
    max_connections_per_client: int = 0  # 0: no per-client limit
    rate_per_client: Rate | None = None  # new connections per client (token bucket)

    @property
    def screens_clients(self) -> bool:
        """Whether anything happens between accept and connect (admission.py)."""
        return bool(self.accept_proxy or self.allow or self.deny or self.max_connections_per_client
                    or self.rate_per_client)  # fmt: skip


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
    io: IoName = "auto"  # the readiness backend (trioanubis.proxy.io)


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

    def size(self, key: str, parse: Callable[[object], int] = parse_size) -> int:
        value = self.data.get(key, 0)
        try:
            return parse(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None

    def fraction(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise self.error("must be a number from 0 to 1", value, key)
        return float(value)

    def networks(self, key: str) -> tuple[Network, ...]:
        """A list of CIDRs; each bad entry is named by its index (`allow[2]`)."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error("must be a list of CIDRs like [\"10.0.0.0/8\", \"::1/128\"]", value, key)
        networks = []
        for index, item in enumerate(value):
            try:
                networks.append(parse_network(item))
            except ValueError as exc:
                raise self.error(str(exc), item, f"{key}[{index}]") from None
        return tuple(networks)

    def rate(self, key: str) -> Rate | None:
        if key not in self.data:
            return None
        value = self.data[key]
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None

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
        ("drain_timeout", "log_format", "access_log", "pid_file", "resolver", "max_connections", "io")
    )
    return Settings(
        drain_timeout=node.duration("drain_timeout", 30.0),
        log_format=node.choice("log_format", "text", ("text", "json")),  # type: ignore[arg-type]
        access_log=node.boolean("access_log", True),
        pid_file=node.string("pid_file", ""),
        resolver=_resolver(node),
        max_connections=node.integer("max_connections", 0),
        io=_io(node),
    )


def _io(node: _Node) -> IoName:
    value = node.choice("io", "auto", IO_CHOICES)
    if value == "epoll" and not epoll_available():
        raise node.error("this platform has no epoll; use 'auto' or 'portable'", value, "io")
    return value  # type: ignore[return-value]


def _resolver(node: _Node) -> str:
    value = node.string("resolver", "")
    if value:
        try:
            parse_address(value)
        except ValueError as exc:
            raise node.error(str(exc), value, "resolver") from None
    return value


_LISTENER_CLIENT_KEYS = (
    "accept_proxy", "proxy_trusted", "proxy_timeout", "allow", "deny", "max_connections_per_client",
    "rate_per_client",
)  # fmt: skip


def _parse_listener(name: str, node: _Node) -> ListenerConfig:
    node.check_keys(("bind", "pool", "max_connections", "backlog", *_LISTENER_CLIENT_KEYS))
    if "pool" not in node.data:
        raise node.error("is required (the name of a [pools.NAME] table)", key="pool")
    return ListenerConfig(
        name=name,
        bind=node.address("bind", allow_any_host=True),
        pool=node.string("pool", ""),
        max_connections=node.integer("max_connections", 0),
        backlog=node.integer("backlog", 0, maximum=65535),
        **_parse_client_options(node),
    )


def _parse_client_options(node: _Node) -> dict[str, Any]:
    """Who may connect to a listener: the PROXY protocol, allow/deny, per-client limits."""
    accept_proxy = node.boolean("accept_proxy", False)
    trusted = node.networks("proxy_trusted")
    if accept_proxy and not trusted:
        raise node.error("is required with accept_proxy = true: the proxies allowed to send a PROXY "
                         "header, e.g. [\"10.0.0.0/8\", \"::1/128\"]", key="proxy_trusted")  # fmt: skip
    if trusted and not accept_proxy:
        raise node.error("has no effect without accept_proxy = true", key="proxy_trusted")
    if "proxy_timeout" in node.data and not accept_proxy:
        raise node.error("has no effect without accept_proxy = true", key="proxy_timeout")
    return {
        "accept_proxy": accept_proxy,
        "proxy_trusted": trusted,
        "proxy_timeout": node.duration("proxy_timeout", 3.0, positive=True),
        "allow": node.networks("allow"),
        "deny": node.networks("deny"),
        "max_connections_per_client": node.integer("max_connections_per_client", 0),
        "rate_per_client": node.rate("rate_per_client"),
    }


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
    "resolver", "health", "send_proxy", "faults",
)  # fmt: skip
_SEND_PROXY = ("none", "v1", "v2")


def _parse_pool(name: str, node: _Node) -> PoolConfig:
    node.check_keys(_POOL_KEYS)
    strategy = node.string("strategy", "round_robin")
    from trioanubis.strategies import StrategyError, resolve_strategy

    try:
        resolve_strategy(strategy)
    except StrategyError as exc:
        raise node.error(str(exc), strategy, "strategy") from None
    servers, discovery = _parse_servers(node)
    health = _parse_health(node.child("health"))
    send_proxy = node.choice("send_proxy", "none", _SEND_PROXY)
    sending = send_proxy != "none" or any(s.send_proxy not in ("", "none") for s in servers)
    if health.send_proxy and not sending:
        raise node.child("health").error("has no effect: neither the pool nor any server sets send_proxy",
                                         key="send_proxy")  # fmt: skip
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
        health=health,
        send_proxy=send_proxy,  # type: ignore[arg-type]
        faults=_parse_faults(node.child("faults")) if "faults" in node.data else None,
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
        item.check_keys(("address", "weight", "name", "max_connections", "send_proxy", "faults"))
        address = item.address("address")
        server = ServerConfig(
            address=address,
            name=item.string("name", "") or str(address),
            weight=item.integer("weight", 1, maximum=1_000_000),
            max_connections=item.integer("max_connections", 0),
            send_proxy=item.choice("send_proxy", "", _SEND_PROXY) if "send_proxy" in item.data else "",  # type: ignore[arg-type]
            faults=_parse_faults(item.child("faults")) if "faults" in item.data else None,
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
         "rise", "fall", "slow_start", "send_proxy")
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
        send_proxy=node.boolean("send_proxy", False),
    )


FAULT_KEYS = (
    "direction", "probability", "latency", "jitter", "bandwidth", "reset_after", "close_after",
    "blackhole", "refuse", "slice", "slice_delay",
)  # fmt: skip
# Longer than any test would wait: a typo like "200s" for "200ms" is caught.
MAX_FAULT_DELAY = 60.0


def _parse_faults(node: _Node) -> FaultConfig:
    """A `faults` table (config, or an admin PUT body); every error names the key."""
    node.check_keys(FAULT_KEYS)
    delays = {}
    for key in ("latency", "jitter", "slice_delay"):
        delays[key] = node.duration(key, 0.0)
        if delays[key] > MAX_FAULT_DELAY:
            raise node.error(f"must be at most {MAX_FAULT_DELAY:g}s", node.data[key], key)
    faults = FaultConfig(
        direction=node.choice("direction", "both", ("upstream", "downstream", "both")),  # type: ignore[arg-type]
        probability=node.fraction("probability", 1.0),
        bandwidth=node.size("bandwidth", parse_bandwidth),
        reset_after=node.size("reset_after"),
        close_after=node.size("close_after"),
        blackhole=node.boolean("blackhole", False),
        refuse=node.boolean("refuse", False),
        slice=node.size("slice"),
        **delays,
    )
    if faults.slice_delay and not faults.slice:
        raise node.error("has no effect without slice", node.data["slice_delay"], "slice_delay")
    if faults.jitter > faults.latency:
        raise node.error("must not exceed latency (a chunk is never due before it arrived)",
                         node.data["jitter"], "jitter")  # fmt: skip
    return faults


def parse_faults(data: object, source: str = "admin request") -> FaultConfig:
    """A faults table from elsewhere than a file (the admin's JSON body); ConfigError naming the key."""
    return _parse_faults(_Node(data, "faults", source))


def proxy_config(listen: str, servers: list[str], strategy: str) -> Config:
    """The config `anubis proxy LISTEN SERVER...` stands for; errors name the argument."""
    data = {
        "listeners": {"proxy": {"bind": listen, "pool": "proxy"}},
        "pools": {"proxy": {"strategy": strategy, "servers": servers, "health": {"check": "tcp"}}},
    }
    return parse_config(data, "anubis proxy")
