"""The frozen records a config file becomes, and the names of its choices.

Theory of operation: everything here is data. A `Config` is built once per
load by the section parsers (`settings.py`, `listeners.py`, `pools.py`,
`health_checks.py`, `spawn.py`, `faults.py`) and never changes afterwards; a
reload builds a new one and `reload.py` compares the two. Defaults live in the
field declarations, so a record built in a test without a file has the same
defaults as a key left out of a file. Records compare by value, except the TLS
contexts, which are loaded objects (a reload rebuilds them from the paths).

Nothing here validates: a record holds what the parsers accepted.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, final

# Health check kinds that talk (everything but tcp, http and none), and which of
# them let the server speak first: sending before its banner would be a protocol error.
PROTOCOL_CHECKS: Final = ("send_expect", "redis", "postgres", "mysql", "smtp", "banner")
SERVER_FIRST: Final = ("mysql", "smtp", "banner")
# Presets whose reply is a parsed protocol message: send/expect make no sense there.
PARSED: Final = ("postgres", "mysql")

HealthCheck = Literal["tcp", "http", "none", "send_expect", "redis", "postgres", "mysql", "smtp", "banner"]
HEALTH_CHECKS: tuple[str, ...] = ("tcp", "http", "none", *PROTOCOL_CHECKS)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SendProxy = Literal["none", "v1", "v2"]
LeastTimeMode = Literal["first_byte", "connect"]
LogFormat = Literal["text", "json"]
FaultDirection = Literal["upstream", "downstream", "both"]
# The readiness backends (trioanubis.proxy.io builds them).
IoName = Literal["auto", "epoll", "portable"]
IO_CHOICES: Final[tuple[IoName, ...]] = ("auto", "epoll", "portable")

# Priority groups: 0 is served first; `backup = true` means 1.
BACKUP_PRIORITY = 1
# Protocol checks: the default of the bytes one check may read.
EXPECT_BYTES = 4096



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
    """Network faults injected on a server's connections (trioanubis.proxy.faults); all zero: none."""

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
class AgentConfig:
    """`[pools.X.health] agent = { port = N }`: an agent check beside the health check (health/agent.py)."""

    port: int
    host: str = ""  # "": the server's own host
    interval: float = 2.0
    timeout: float = 1.0  # for one whole round: connect, send, the line
    send: bytes = b""  # sent once connected ("": nothing, the agent speaks first)


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
    agent: AgentConfig | None = None  # an agent check beside this one (HAProxy agent-check)


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    """Replicas the balancer runs itself (spawn.py); paths are absolute, resolved at parse time."""

    command: tuple[str, ...]  # "{port}" in any argument becomes the replica's port
    replicas: int = 1
    cwd: str = ""
    env: tuple[tuple[str, str], ...] = ()
    watch: tuple[str, ...] = ()  # glob patterns (absolute): a change rolls the replicas
    host: str = "127.0.0.1"
    ports: tuple[int, int] | None = None  # replicas' ports from first to last; None: the kernel picks
    start_timeout: float = 30.0  # for a new replica to listen (and, in a roll, to pass its check)
    stop_grace: float = 5.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True, slots=True)
class TlsServer:
    """A listener's `tls`: clients speak TLS to us. `context` is loaded while parsing (tls/context.py)."""

    certificates: tuple[tuple[str, str], ...]  # (cert, key) paths; the first is the default
    context: ssl.SSLContext = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class TlsClient:
    """A pool's `tls`: we speak TLS to its servers. `context` is loaded while parsing (tls/context.py)."""

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
    balance_factor: float = 0.0  # hash strategies: bounded loads (strategies/bounded.py); 0: unbounded
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
    abort_on_close: bool = True  # a held client that sent FIN has gone (HAProxy's abortonclose)
    spawn: SpawnConfig | None = None
    tls: TlsClient | None = None
    faults: FaultConfig | None = None  # injected on every server's connections (trioanubis.faults)
    servers_from: str = ""  # "etcd": servers also come from [cluster]'s keys (trioanubis/fleet/)
    # Mirroring (proxy/mirror.py): a copy of the client's bytes of `mirror_percent` of the connections
    # goes to `mirror`, its answers thrown away. `mirror` is a pool's name or "host:port" ("": none);
    # load.py decides which, and sets `mirror_address` when it is an address.
    mirror: str = ""
    mirror_address: Address | None = None
    mirror_percent: float = 100.0
    # Bandwidth limits in bytes per second (proxy/rates.py); 0: none. Upload is client → server.
    upload_rate: int = 0  # per connection
    download_rate: int = 0
    upload_rate_per_client: int = 0  # one budget shared by all of a client's connections to this pool
    download_rate_per_client: int = 0


@final
@dataclass(frozen=True, slots=True)
class Route:
    """One of a listener's `routes`: clients whose ClientHello names `sni` go to `pool` (sni_routes.py)."""

    sni: str  # "api.example.com" or "*.example.com", lower case
    pool: str
    alpn: str = ""  # "": any client


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
    upload_rate: int = 0  # bytes per second per connection (proxy/rates.py); a pool's, if tighter, wins
    download_rate: int = 0

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
    # Names the Host header may carry besides an IP address and localhost (admin.py: DNS rebinding).
    hosts: tuple[str, ...] = ()


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
    state_file: str = ""  # where the operator's runtime changes are kept across restarts ("": nowhere)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: the etcd a fleet shares (trioanubis/fleet/); `name` "" means "host:pid"."""

    endpoints: tuple[str, ...]
    prefix: str = "/anubis/"
    name: str = ""
    ttl: int = 10  # seconds: the membership lease; an instance gone is dropped this long after
    timeout: float = 5.0  # one etcd request (connect, send, answer)
    ca: str = ""
    cert: str = ""
    key: str = ""
    username: str = ""
    password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    listeners: Mapping[str, ListenerConfig]
    pools: Mapping[str, PoolConfig]
    settings: Settings = field(default_factory=Settings)
    admin: AdminConfig | None = None
    source: str = "<config>"
    cluster: ClusterConfig | None = None
