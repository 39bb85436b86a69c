"""Configuration: TOML text → frozen, typed records.

Theory of operation: `load_config` reads a file, `parse_config` turns a TOML
mapping into a `Config`. Both are pure apart from reading the file (a regular
file of at most `MAX_CONFIG_BYTES`) and importing a custom strategy; nothing
here resolves names or opens sockets. Validation is the only gate: what it
accepts, `run` and a reload can apply without failing on a value, so beyond
types and ranges it checks what the layers underneath would choke on
(`config_checks.py`: host names, HTTP header text, overlapping binds).

Every rejection is a `ConfigError` whose message has the shape
``FILE: KEY.PATH: what is wrong, got VALUE`` so the operator can find the
line without a traceback. Unknown keys are rejected with
a did-you-mean suggestion, because a misspelt timeout silently falling back to
its default is the worst kind of config bug.

The schema is a contract: keys are added, never renamed.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import shutil
import ssl
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from trioanubis.config_checks import (
    check_header_host,
    check_header_path,
    check_host_name,
    find_bind_overlap,
    ip_address_or_none,
)
from trioanubis.errors import ConfigError
from trioanubis.health.expect import PARSED, PROTOCOL_CHECKS, SERVER_FIRST, compile_regex, decode_escapes
from trioanubis.proxy.io import IO_CHOICES, IoName, epoll_available
from trioanubis.proxy.sni_routes import Route, check_pattern

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

HealthCheck = Literal["tcp", "http", "none", "send_expect", "redis", "postgres", "mysql", "smtp", "banner"]
HEALTH_CHECKS: tuple[str, ...] = ("tcp", "http", "none", *PROTOCOL_CHECKS)
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

# A config file is a page of text; anything larger is a mistake (or /dev/zero).
MAX_CONFIG_BYTES: Final = 1 << 20
# The port of a DNS resolver given as a bare address.
DNS_PORT: Final = 53
# Priority groups: 0 is served first; `backup = true` means 1. A hundred levels
# is far more than any failover chain (Envoy's are usually 2 or 3).
MAX_PRIORITY = 100
BACKUP_PRIORITY = 1
# Protocol checks: the default and the ceiling of the bytes one check may read,
# and the most a check may send (a request, not a payload).
EXPECT_BYTES = 4096
MAX_EXPECT_BYTES = 1 << 20
MAX_SEND = 65536


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
    priority: int = 0  # the lowest priority with a usable server takes the traffic
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
    priority: int = 0


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
    send: bytes | None = None  # protocol checks; None: the preset's (or nothing)
    expect: bytes = b""
    expect_regex: str = ""
    expect_bytes: int = EXPECT_BYTES
    user: str = "postgres"  # check = "postgres": the startup's user


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    """Replicas the balancer runs itself (spawn.py); paths are absolute, resolved at parse time."""

    command: tuple[str, ...]  # "{port}" in any argument becomes the replica's port
    replicas: int = 1
    cwd: str = ""
    env: tuple[tuple[str, str], ...] = ()
    watch: tuple[str, ...] = ()  # glob patterns (absolute): a change rolls the replicas
    host: str = "127.0.0.1"
    start_timeout: float = 30.0  # for a new replica to listen (and, in a roll, to pass its check)
    stop_grace: float = 5.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True, slots=True)
class TlsServer:
    """A listener's `tls`: clients speak TLS to us. `context` is loaded while parsing (tls.py)."""

    certificates: tuple[tuple[str, str], ...]  # (cert, key) paths; the first is the default
    context: ssl.SSLContext = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class TlsClient:
    """A pool's `tls`: we speak TLS to its servers. `context` is loaded while parsing (tls.py)."""

    verify: bool = True
    ca: str = ""  # "": the system's CAs
    sni: str = ""  # "": the server's host (sent as SNI when it is a name, verified either way)
    cert: str = ""  # a client certificate (mTLS)
    key: str = ""
    context: ssl.SSLContext = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


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
    queue_timeout: float = 0.0  # hold a client this long for a server; 0: close it at once
    max_queued: int = 1000
    spawn: SpawnConfig | None = None
    tls: TlsClient | None = None
    faults: FaultConfig | None = None  # injected on every server's connections (trioanubis.faults)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str  # "" only with routes: a client no route takes is closed
    max_connections: int = 0  # 0: only the process-wide limit applies
    backlog: int = 0  # 0: the kernel's somaxconn
    accept_proxy: bool = False  # read a PROXY protocol header from every client first
    proxy_trusted: tuple[Network, ...] = ()  # the peers allowed to send one (required with accept_proxy)
    proxy_timeout: float = 3.0
    allow: tuple[Network, ...] = ()  # empty: every client
    deny: tuple[Network, ...] = ()  # wins over allow
    max_connections_per_client: int = 0  # 0: no per-client limit
    rate_per_client: Rate | None = None  # new connections per client (token bucket)
    routes: tuple[Route, ...] = ()  # by the ClientHello's server name (sni_routes.py)
    peek_timeout: float = 5.0  # for the ClientHello (routes) and the TLS handshake (tls)
    tls: TlsServer | None = None

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
    shutdown_delay: float = 0.0  # after SIGTERM, keep accepting (not ready) this long, then drain
    log_format: LogFormat = "text"
    access_log: bool = True
    pid_file: str = ""
    resolver: str = ""
    max_connections: int = 0  # 0: derived from the file-descriptor limit
    io: IoName = "auto"  # the readiness backend (trioanubis.proxy.io)
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


# ------------------------------------------------------------------- reading


class _Node:
    """A TOML table being validated; remembers its key path for error messages."""

    def __init__(self, data: object, path: str, source: str, base: Path | None = None) -> None:
        self.path = path
        self.source = source
        self.base = base or Path.cwd()  # where the config's relative paths start
        if not isinstance(data, Mapping):
            raise self.error("must be a table", data)
        self.data: Mapping[str, Any] = data

    def error(self, message: str, value: object = None, key: str | None = None) -> ConfigError:
        where = self.key_path(key) if key is not None else self.path
        got = "" if value is None else f", got {_show(value)}"
        return ConfigError(_one_line(f"{self.source}: {where or '(top level)'}: {message}{got}"))

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known_list = ", ".join(known)
                raise ConfigError(_one_line(
                    f"{self.source}: {self.key_path(key)}: unknown key{hint}; "
                    f"known keys here: {known_list}"
                ))

    def child(self, key: str) -> _Node:
        return self.nested(self.data.get(key, {}), self.key_path(key))

    def nested(self, data: object, path: str) -> _Node:
        """A table inside this one (`path` is its full key path), validated the same way."""
        return _Node(data, path, self.source, self.base)

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


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _show(value: object) -> str:
    """`value` as the config would spell it; a string's control characters escaped, so an
    error stays one line whatever the file holds."""
    if isinstance(value, str):
        return '"' + "".join(_escape(ch) for ch in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _one_line(text: str) -> str:
    """`text` with control characters escaped (a table name may hold any character)."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    return ch if ch.isprintable() else f"\\u{ord(ch):04x}"


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every failure is a ConfigError naming the file.

    A custom strategy ("module:Class") is looked for beside the file first.
    """
    source = str(path)
    try:
        raw = read_config_file(path)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    return parse_config_text(raw.decode("utf-8", errors="replace"), source, Path(path).parent)


def _config_dir(source: str, base_dir: str | Path | None) -> Path:
    if base_dir is not None:
        return Path(base_dir).resolve()
    try:  # `source` names a file, or says where the config came from ("anubis proxy")
        path = Path(source)
        return path.resolve().parent if path.is_file() else Path.cwd()
    except (OSError, ValueError):  # not a path at all (too long, a NUL in it)
        return Path.cwd()


def read_config_file(path: str | Path) -> bytes:
    """At most MAX_CONFIG_BYTES of a regular file; OSError with a strerror otherwise.

    The file is opened without blocking (a FIFO would wait for a writer) and
    checked to be a regular file before a byte is read, so a device such as
    /dev/zero or a pipe is refused instead of read forever.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise OSError(0, f"larger than {MAX_CONFIG_BYTES // 1024} KiB")
    return raw


def parse_config_text(
    text: str, source: str = "<config>", base_dir: str | Path | None = None
) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # the TOML parser recurses once per nested array or table
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    return parse_config(data, source, base_dir)


def parse_config(
    data: Mapping[str, Any], source: str = "<config>", base_dir: str | Path | None = None
) -> Config:
    """Validate a TOML mapping and build the frozen config records.

    Relative paths (a custom strategy's module, a spawn table's cwd and watch
    patterns) start at `base_dir`, else the directory of `source` when it names
    a file (the worker supervisor and its workers parse the file's text), else
    the current directory (`anubis proxy`).
    """
    top = _Node(data, "", source, _config_dir(source, base_dir))
    top.check_keys(("settings", "listeners", "pools", "admin"))
    settings = _parse_settings(top.child("settings"))
    pools_node = top.child("pools")
    pools = {
        name: _parse_pool(name, pools_node.child(name)) for name in pools_node.data
    }
    listeners_node = top.child("listeners")
    if not listeners_node.data:
        raise top.error("at least one [listeners.NAME] table is required")
    listeners = {}
    for name in listeners_node.data:
        listener = _parse_listener(name, listeners_node.child(name))
        named = [(f"{name}.pool", listener.pool)] if listener.pool else []
        named += [(f"{name}.routes[{i}].pool", route.pool) for i, route in enumerate(listener.routes)]
        for key, pool_name in named:
            if pool_name not in pools:
                known = ", ".join(sorted(pools)) or "none are defined"
                raise listeners_node.error(
                    f"names pool {pool_name!r}, which does not exist (pools: {known})", key=key
                )
        listeners[name] = listener
    admin = _parse_admin(top.child("admin")) if "admin" in data else None
    _check_binds(top, listeners, admin)
    return Config(listeners, pools, settings, admin, source)


def _parse_settings(node: _Node) -> Settings:
    node.check_keys(
        ("drain_timeout", "log_format", "access_log", "pid_file", "resolver", "max_connections", "io",
         "workers", "shutdown_delay")
    )
    return Settings(
        drain_timeout=node.duration("drain_timeout", 30.0),
        shutdown_delay=_shutdown_delay(node),
        log_format=node.choice("log_format", "text", ("text", "json")),  # type: ignore[arg-type]
        access_log=node.boolean("access_log", True),
        pid_file=node.string("pid_file", ""),
        resolver=_resolver(node),
        max_connections=node.integer("max_connections", 0),
        io=_io(node),
        workers=_workers(node),
    )


# A shutdown_delay longer than this is a typo: it only has to outlast the time an orchestrator
# takes to stop sending new connections (seconds), well inside a grace period.
MAX_SHUTDOWN_DELAY = 600.0


def _shutdown_delay(node: _Node) -> float:
    """`shutdown_delay`: from 0 to 10m."""
    seconds = node.duration("shutdown_delay", 0.0)
    if seconds > MAX_SHUTDOWN_DELAY:
        raise node.error("must be a duration from 0 to 10m", node.data["shutdown_delay"], "shutdown_delay")
    return seconds


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


def _io(node: _Node) -> IoName:
    value = node.choice("io", "auto", IO_CHOICES)
    if value == "epoll" and not epoll_available():
        raise node.error("this platform has no epoll; use 'auto' or 'portable'", value, "io")
    return value  # type: ignore[return-value]


def _resolver(node: _Node) -> str:
    """A resolver as "ip:port" (the port defaults to 53), or "" for the system's resolvers."""
    value = node.string("resolver", "")
    if not value:
        return ""
    try:
        return str(parse_resolver(value))
    except ValueError as exc:
        raise node.error(str(exc), value, "resolver") from None


_LISTENER_CLIENT_KEYS = (
    "accept_proxy", "proxy_trusted", "proxy_timeout", "allow", "deny", "max_connections_per_client",
    "rate_per_client",
)  # fmt: skip


def _parse_listener(name: str, node: _Node) -> ListenerConfig:
    node.check_keys(("bind", "pool", "max_connections", "backlog", "routes", "peek_timeout", "tls",
                     *_LISTENER_CLIENT_KEYS))  # fmt: skip
    routes = _parse_routes(node)
    if "pool" not in node.data and not routes:
        raise node.error("is required (the name of a [pools.NAME] table)", key="pool")
    if "pool" in node.data and not node.string("pool", ""):
        raise node.error("must name a [pools.NAME] table", "", "pool")
    if "peek_timeout" in node.data and not routes and "tls" not in node.data:
        raise node.error("has no effect without routes or tls", key="peek_timeout")
    return ListenerConfig(
        name=name,
        bind=node.address("bind", allow_any_host=True),
        pool=node.string("pool", ""),
        max_connections=node.integer("max_connections", 0),
        backlog=node.integer("backlog", 0, maximum=65535),
        routes=routes,
        peek_timeout=node.duration("peek_timeout", 5.0, positive=True),
        tls=_parse_tls_server(node) if "tls" in node.data else None,
        **_parse_client_options(node),
    )


def _parse_routes(node: _Node) -> tuple[Route, ...]:
    """`routes = [{ sni = "api.example.com", pool = "api", alpn = "h2" }, …]`; each error names its index."""
    value = node.data.get("routes", [])
    if not isinstance(value, list):
        raise node.error("must be an array of { sni = \"…\", pool = \"…\" } tables", value, "routes")
    routes = []
    for index, entry in enumerate(value):
        item = node.nested(entry, node.key_path(f"routes[{index}]"))
        item.check_keys(("sni", "pool", "alpn"))
        for key in ("sni", "pool"):
            if not item.string(key, ""):
                raise item.error("is required", key=key)
        sni = item.string("sni", "")
        try:
            pattern = check_pattern(sni)
        except ValueError as exc:
            raise item.error(str(exc), sni, "sni") from None
        alpn = item.string("alpn", "")
        if "alpn" in item.data and not 0 < len(alpn.encode()) < 256:
            raise item.error("must be a protocol name like \"h2\" or \"http/1.1\"", alpn, "alpn")
        routes.append(Route(pattern, item.string("pool", ""), alpn))
    return tuple(routes)


def _parse_tls_server(node: _Node) -> TlsServer:
    """`tls = { cert = "…", key = "…" }`, or an array of them (the first is the default)."""
    from trioanubis.tls.context import TlsConfigError, server_context

    value = node.data["tls"]
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise node.error("must be { cert = \"…\", key = \"…\" } or a non-empty array of them", value, "tls")
    pairs = []
    for index, entry in enumerate(entries):
        item = node.nested(entry, node.key_path(f"tls[{index}]" if isinstance(value, list) else "tls"))
        item.check_keys(("cert", "key"))
        for key in ("cert", "key"):
            if not item.string(key, ""):
                raise item.error("is required (a PEM file)", key=key)
        pair = (item.string("cert", ""), item.string("key", ""))
        try:
            server_context([pair])
        except TlsConfigError as exc:
            raise item.error(str(exc)) from None
        pairs.append(pair)
    try:
        context = server_context(pairs)
    except TlsConfigError as exc:
        raise node.error(str(exc), key="tls") from None
    return TlsServer(tuple(pairs), context)


def _parse_tls_client(node: _Node) -> TlsClient:
    from trioanubis.tls.context import TlsConfigError, client_context

    node.check_keys(("verify", "ca", "sni", "cert", "key"))
    options = {"verify": node.boolean("verify", True)}
    strings = {key: node.string(key, "") for key in ("ca", "sni", "cert", "key")}
    if strings["sni"]:
        try:
            if check_pattern(strings["sni"]).startswith("*"):
                raise ValueError("must be a name, not a wildcard")
        except ValueError as exc:
            raise node.error(str(exc), strings["sni"], "sni") from None
    try:
        context = client_context(verify=options["verify"], ca=strings["ca"], cert=strings["cert"],
                                 key=strings["key"])  # fmt: skip
    except TlsConfigError as exc:
        raise node.error(str(exc)) from None
    return TlsClient(verify=options["verify"], context=context, **strings)


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


def _check_binds(
    top: _Node, listeners: Mapping[str, ListenerConfig], admin: AdminConfig | None
) -> None:
    """Refuse two listening sockets (the admin's too) whose addresses overlap on one port."""
    binds = {f"listeners.{name}.bind": lc.bind for name, lc in listeners.items()}
    if admin is not None:
        binds["admin.bind"] = admin.bind
    clash = find_bind_overlap((key, a.host, a.port) for key, a in binds.items())
    if clash is not None:
        first, second, why = clash
        raise top.error(
            f"overlaps {first} = {_show(str(binds[first]))} on port {binds[second].port}: {why}",
            str(binds[second]),
            key=second,
        )


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
    "resolver", "health", "send_proxy", "queue_timeout", "max_queued", "spawn", "tls", "faults",
)  # fmt: skip
_SEND_PROXY = ("none", "v1", "v2")


def _parse_pool(name: str, node: _Node) -> PoolConfig:
    node.check_keys(_POOL_KEYS)
    strategy = node.string("strategy", "round_robin")
    from trioanubis.strategies import StrategyError, check_strategy

    try:
        check_strategy(strategy, node.base)
    except StrategyError as exc:
        raise node.error(str(exc), strategy, "strategy") from None
    servers, discovery = _parse_servers(node)
    health = _parse_health(node.child("health"))
    send_proxy = node.choice("send_proxy", "none", _SEND_PROXY)
    sending = send_proxy != "none" or any(s.send_proxy not in ("", "none") for s in servers)
    if health.send_proxy and not sending:
        raise node.child("health").error("has no effect: neither the pool nor any server sets send_proxy",
                                         key="send_proxy")  # fmt: skip
    if "tls" in node.data and sending:
        raise node.error("cannot be combined with send_proxy (yet): the PROXY header would have to go "
                         "before the TLS handshake", key="tls")  # fmt: skip
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
        queue_timeout=node.duration("queue_timeout", 0.0),
        max_queued=node.integer("max_queued", 1000, minimum=1, maximum=1_000_000),
        spawn=_parse_spawn(node.child("spawn")) if "spawn" in node.data else None,
        tls=_parse_tls_client(node.child("tls")) if "tls" in node.data else None,
        faults=_parse_faults(node.child("faults")) if "faults" in node.data else None,
    )


def _parse_servers(node: _Node) -> tuple[tuple[ServerConfig, ...], tuple[DiscoveryConfig, ...]]:
    entries = node.data.get("servers")
    if "spawn" in node.data and entries in (None, []):
        return (), ()  # the replicas are the servers
    if not isinstance(entries, list) or not entries:
        raise node.error("must be a non-empty array of servers", entries, "servers")
    servers: list[ServerConfig] = []
    discovery: list[DiscoveryConfig] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        path = node.key_path(f"servers[{index}]")
        if isinstance(entry, str):
            entry = {"address": entry}
        item = node.nested(entry, path)
        if "dns" in item.data or "srv" in item.data:
            discovery.append(_parse_discovery(item))
            continue
        item.check_keys(("address", "weight", "name", "max_connections", "send_proxy", "backup", "priority",
                         "faults"))
        address = item.address("address")
        server = ServerConfig(
            address=address,
            name=item.string("name", "") or str(address),
            weight=item.integer("weight", 1, maximum=1_000_000),
            max_connections=item.integer("max_connections", 0),
            send_proxy=item.choice("send_proxy", "", _SEND_PROXY) if "send_proxy" in item.data else "",  # type: ignore[arg-type]
            priority=_parse_priority(item),
            faults=_parse_faults(item.child("faults")) if "faults" in item.data else None,
        )
        if server.name in names:
            raise item.error("duplicate server name in this pool", server.name, "name")
        names.add(server.name)
        servers.append(server)
    return tuple(servers), tuple(discovery)


def _parse_discovery(item: _Node) -> DiscoveryConfig:
    item.check_keys(("dns", "srv", "refresh", "weight", "max_connections", "backup", "priority"))
    if "dns" in item.data and "srv" in item.data:
        raise item.error("give either dns or srv, not both")
    refresh = item.duration("refresh", 10.0, positive=True)
    weight = item.integer("weight", 1, maximum=1_000_000)
    max_connections = item.integer("max_connections", 0)
    priority = _parse_priority(item)
    if "srv" in item.data:
        name = item.string("srv", "")
        if not name:
            raise item.error("must be a DNS name like \"_http._tcp.example\"", name, "srv")
        _checked(item, "srv", name, check_host_name)
        return DiscoveryConfig("srv", name, 0, refresh, weight, max_connections, priority)
    address = item.address("dns")
    return DiscoveryConfig("dns", address.host, address.port, refresh, weight, max_connections, priority)


def _parse_priority(item: _Node) -> int:
    """`priority = N` or `backup = true` (priority 1); giving both is ambiguous."""
    if "backup" in item.data and "priority" in item.data:
        raise item.error("give either backup = true or priority = N, not both")
    if item.boolean("backup", False):
        return BACKUP_PRIORITY
    return item.integer("priority", 0, maximum=MAX_PRIORITY)


def _parse_health(node: _Node) -> HealthConfig:
    node.check_keys(
        ("check", "path", "host", "expect_status", "expect_body", "interval", "timeout",
         "rise", "fall", "slow_start", "send_proxy", *_PROBE_KEYS)
    )  # fmt: skip
    path = _checked(node, "path", node.string("path", "/health"), check_header_path)
    host = node.string("host", "")  # "": the server's own address
    if host:
        _checked(node, "host", host, check_header_host)
    check = node.choice("check", "tcp", HEALTH_CHECKS)
    return HealthConfig(
        check=check,  # type: ignore[arg-type]
        path=path,
        host=host,
        expect_status=node.integer("expect_status", 200, minimum=100, maximum=599),
        expect_body=node.string("expect_body", ""),
        interval=node.duration("interval", 2.0, positive=True),
        timeout=node.duration("timeout", 1.0, positive=True),
        rise=node.integer("rise", 2, minimum=1, maximum=1000),
        fall=node.integer("fall", 3, minimum=1, maximum=1000),
        slow_start=node.duration("slow_start", 0.0),
        send_proxy=node.boolean("send_proxy", False),
        **_parse_probe(node, check),
    )


def _checked(node: _Node, key: str, value: str, check: Callable[[str], None]) -> str:
    try:
        check(value)
    except ValueError as exc:
        raise node.error(str(exc), value, key) from None
    return value


_PROBE_KEYS = ("send", "expect", "expect_regex", "expect_bytes", "user")


def _parse_probe(node: _Node, check: str) -> dict[str, Any]:
    """The send/expect keys of a protocol check, checked against what its kind allows."""
    given = [key for key in _PROBE_KEYS if key in node.data]
    if check not in PROTOCOL_CHECKS:
        if given:
            raise node.error(f"is only used by the checks {', '.join(PROTOCOL_CHECKS)}",
                             node.data[given[0]], given[0])  # fmt: skip
        return {}
    for key in given:
        if key in ("send", "expect", "expect_regex") and check in PARSED:
            raise node.error(f"check = {check!r} speaks its protocol itself; use "
                             f"check = \"send_expect\" for a conversation of your own",
                             node.data[key], key)  # fmt: skip
        if key == "send" and check in SERVER_FIRST:
            raise node.error(f"check = {check!r} waits for the server to speak first; use "
                             f"check = \"send_expect\" to send", node.data[key], key)  # fmt: skip
        if key == "user" and check != "postgres":
            raise node.error("is only used by check = \"postgres\"", node.data[key], key)
    limit = node.integer("expect_bytes", EXPECT_BYTES, minimum=1, maximum=MAX_EXPECT_BYTES)
    send = _escaped(node, "send", MAX_SEND) if "send" in node.data else None
    expect = _escaped(node, "expect", limit)
    regex = node.string("expect_regex", "")
    _check_expectation(node, check, send, expect, regex)
    return {"send": send, "expect": expect, "expect_regex": regex, "expect_bytes": limit,
            "user": _pg_user(node)}  # fmt: skip


def _escaped(node: _Node, key: str, limit: int) -> bytes:
    text = node.string(key, "")
    try:
        data = decode_escapes(text)
    except ValueError as exc:
        raise node.error(str(exc), text, key) from None
    if len(data) > limit:
        raise node.error(f"is {len(data)} bytes, more than the {limit} allowed here", text, key)
    return data


def _check_expectation(node: _Node, check: str, send: bytes | None, expect: bytes, regex: str) -> None:
    if "expect" in node.data and not expect:
        raise node.error("must not be empty (it would match any reply)", "", "expect")
    if expect and regex:
        raise node.error("give either expect or expect_regex, not both", regex, "expect_regex")
    if regex:
        try:
            compile_regex(regex)
        except ValueError as exc:
            raise node.error(str(exc), regex, "expect_regex") from None
    if check in ("send_expect", "banner") and not (expect or regex):
        raise node.error(f"check = {check!r} needs expect or expect_regex", key="expect")
    if check == "redis" and (expect or regex) and send is None:
        key = "expect" if expect else "expect_regex"
        raise node.error("replaces the preset's reply, so give send too (the preset sends PING)",
                         node.data[key], key)  # fmt: skip


def _pg_user(node: _Node) -> str:
    user = node.string("user", "postgres")
    if not user or "\x00" in user or len(user.encode()) > 63:
        raise node.error("must be a PostgreSQL role name (1 to 63 bytes, no NUL)", user, "user")
    return user


# The largest replica count: a dev machine's worth of processes, not a fork bomb.
MAX_REPLICAS = 64
_SPAWN_KEYS = ("command", "replicas", "cwd", "env", "watch", "host", "start_timeout", "stop_grace")


def _parse_spawn(node: _Node) -> SpawnConfig:
    node.check_keys(_SPAWN_KEYS)
    base = node.base
    cwd = str(base / node.string("cwd", "."))
    if not os.path.isdir(cwd):
        raise node.error("must name an existing directory", node.data.get("cwd", "."), "cwd")
    env = _string_table(node, "env")
    return SpawnConfig(
        command=_command(node, cwd, dict(env)),
        replicas=node.integer("replicas", 1, minimum=1, maximum=MAX_REPLICAS),
        cwd=cwd,
        env=env,
        watch=tuple(str(base / pattern) for pattern in _string_list(node, "watch")),
        host=_loopback_host(node),
        start_timeout=node.duration("start_timeout", 30.0, positive=True),
        stop_grace=node.duration("stop_grace", 5.0),
    )


def _string_list(node: _Node, key: str) -> tuple[str, ...]:
    value = node.data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
        raise node.error("must be an array of non-empty strings", value, key)
    return tuple(value)


def _string_table(node: _Node, key: str) -> tuple[tuple[str, str], ...]:
    table = node.child(key)
    pairs = []
    for name, value in table.data.items():
        if not name or "=" in name or "\0" in name:
            raise table.error("must be an environment variable name", name, name)
        if not isinstance(value, str) or "\0" in value:
            raise table.error("must be a string", value, name)
        pairs.append((name, value))
    return tuple(pairs)


def _command(node: _Node, cwd: str, env: dict[str, str]) -> tuple[str, ...]:
    """The argument vector; its program must exist now, so `anubis check` catches a typo."""
    command = _string_list(node, "command")
    if not command:
        raise node.error("must be a non-empty array: the program and its arguments", [], "command")
    program = command[0].replace("{port}", "0")
    path = env.get("PATH", os.environ.get("PATH", os.defpath))
    found = shutil.which(program, path=path) if os.sep not in program \
        else shutil.which(os.path.join(cwd, program))  # fmt: skip
    if found is None:
        raise node.error("names no executable program (looked in PATH and cwd)", command[0], "command[0]")
    return command


def _loopback_host(node: _Node) -> str:
    host = node.string("host", "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise node.error("must be an IP address the replicas listen on", host, "host") from None
    return host


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


def proxy_config(
    listen: str,
    servers: list[str],
    strategy: str,
    *,
    queue_timeout: str | float = "10s",
    spawn: list[str] | None = None,
    replicas: int = 1,
    watch: list[str] | None = None,
    tls: tuple[str, str] | None = None,
) -> Config:
    """The config `anubis proxy LISTEN SERVER...` stands for; errors name the argument.

    Unlike a config file's pools, the proxy holds clients for `queue_timeout`
    while no server is up (a developer restarting the one server behind it).
    """
    pool: dict[str, object] = {
        "strategy": strategy, "servers": servers, "health": {"check": "tcp"},
        "queue_timeout": queue_timeout,
    }  # fmt: skip
    if spawn is not None:
        pool["spawn"] = {"command": spawn, "replicas": replicas, "watch": watch or []}
    elif watch:
        raise ConfigError("anubis proxy: --watch restarts spawned replicas: it needs --spawn")
    listener: dict[str, Any] = {"bind": listen, "pool": "proxy"}
    if tls is not None:  # --tls: clients speak TLS to a certificate made for localhost
        listener["tls"] = {"cert": tls[0], "key": tls[1]}
    data = {"listeners": {"proxy": listener}, "pools": {"proxy": pool}}
    return parse_config(data, "anubis proxy")
