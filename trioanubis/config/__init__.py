"""Configuration: TOML → frozen records, every error naming file, key path and value.

Theory of operation: the package reads bottom-up, each module importing only
the ones above it in this list (and `trioanubis.errors`):

- `model.py`: the frozen records (`Config`, `PoolConfig`, `Address`, ...);
- `checks.py`: what the layers underneath would choke on (host names, HTTP
  header text, SNI patterns, overlapping binds), plain values in;
- `values.py`: single values (durations, rates, sizes, networks, addresses,
  escaped bytes), plain values in and out, `ValueError` with the reason;
- `ranges.py`: every numeric key's kind and range, the table `node.py` reads;
- `node.py`: a table under validation, which turns a reason into a
  `ConfigError` naming file, key path and value;
- the section parsers: `settings.py` (settings, admin), `cluster.py`, `faults.py`,
  `spawn.py`, `health_checks.py`, `pools.py`, `listeners.py`;
- `load.py`: reading the file, the whole document, the checks across tables.

Nothing here imports the rest of trioanubis, except two leaves loaded while
parsing so that `anubis check` proves what `run` will do: TLS contexts
(`trioanubis.tls.context`) and custom strategies (`trioanubis.strategies`).
`tests/test_layout.py` holds this. Everything other modules use is
re-exported here: `from trioanubis.config import X`.
"""

from __future__ import annotations

from trioanubis.config.checks import check_pattern, find_bind_overlap, ip_address_or_none, listen_ip
from trioanubis.config.faults import FAULT_KEYS, parse_faults
from trioanubis.config.health_checks import MAX_SEND
from trioanubis.config.load import (
    MAX_CONFIG_BYTES,
    load_config,
    parse_config,
    parse_config_text,
    proxy_config,
    read_config_file,
)
from trioanubis.config.model import (
    BACKUP_PRIORITY,
    EXPECT_BYTES,
    HEALTH_CHECKS,
    IO_CHOICES,
    PARSED,
    PROTOCOL_CHECKS,
    SERVER_FIRST,
    Address,
    AdminConfig,
    AgentConfig,
    ClusterConfig,
    Config,
    DiscoveryConfig,
    FaultConfig,
    FaultDirection,
    HealthCheck,
    HealthConfig,
    IoName,
    LeastTimeMode,
    ListenerConfig,
    LogFormat,
    Network,
    PoolConfig,
    Rate,
    Route,
    SendProxy,
    ServerConfig,
    Settings,
    SpawnConfig,
    TlsClient,
    TlsServer,
)
from trioanubis.config.node import Node, show_value
from trioanubis.config.pools import SERVER_KEYS, parse_server
from trioanubis.config.ranges import (
    MAX_CONNECTIONS,
    MAX_EXPECT_BYTES,
    MAX_FAULT_DELAY,
    MAX_PRIORITY,
    MAX_REPLICAS,
    MAX_WEIGHT,
    MAX_WORKERS,
    RANGES,
    WEIGHT,
    range_of,
)
from trioanubis.config.settings import MAX_TOKEN_BYTES, epoll_available
from trioanubis.config.spawn import port_range
from trioanubis.config.values import (
    DAY,
    DNS_PORT,
    MAX_SIZE,
    RATE_PERIOD,
    Range,
    compile_regex,
    decode_escapes,
    parse_address,
    parse_bandwidth,
    parse_duration,
    parse_fraction,
    parse_integer,
    parse_network,
    parse_rate,
    parse_resolver,
    parse_size,
)
from trioanubis.errors import ConfigError

__all__ = [
    "BACKUP_PRIORITY",
    "DAY",
    "DNS_PORT",
    "EXPECT_BYTES",
    "FAULT_KEYS",
    "HEALTH_CHECKS",
    "IO_CHOICES",
    "MAX_CONFIG_BYTES",
    "MAX_CONNECTIONS",
    "MAX_EXPECT_BYTES",
    "MAX_FAULT_DELAY",
    "MAX_PRIORITY",
    "MAX_REPLICAS",
    "MAX_SEND",
    "MAX_SIZE",
    "MAX_TOKEN_BYTES",
    "MAX_WEIGHT",
    "MAX_WORKERS",
    "PARSED",
    "PROTOCOL_CHECKS",
    "RANGES",
    "RATE_PERIOD",
    "SERVER_FIRST",
    "SERVER_KEYS",
    "WEIGHT",
    "Address",
    "AdminConfig",
    "AgentConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "FaultConfig",
    "FaultDirection",
    "HealthCheck",
    "HealthConfig",
    "IoName",
    "LeastTimeMode",
    "ListenerConfig",
    "LogFormat",
    "Network",
    "Node",
    "PoolConfig",
    "Range",
    "Rate",
    "Route",
    "SendProxy",
    "ServerConfig",
    "Settings",
    "SpawnConfig",
    "TlsClient",
    "TlsServer",
    "check_pattern",
    "compile_regex",
    "decode_escapes",
    "epoll_available",
    "find_bind_overlap",
    "ip_address_or_none",
    "listen_ip",
    "load_config",
    "parse_address",
    "parse_bandwidth",
    "parse_config",
    "parse_config_text",
    "parse_duration",
    "parse_faults",
    "parse_fraction",
    "parse_integer",
    "parse_network",
    "parse_rate",
    "parse_resolver",
    "parse_server",
    "parse_size",
    "port_range",
    "proxy_config",
    "range_of",
    "read_config_file",
    "show_value",
]  # fmt: skip
