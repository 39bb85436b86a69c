"""The `[pools.NAME]` tables: servers (listed or discovered), how to pick and reach them.

Theory of operation: `parse_pool` turns one table into a `PoolConfig`. Its
servers are strings ("host:port") or tables; a table with `dns` or `srv` is a
discovery entry instead, resolved later by `discovery.py`. The nested tables
have parsers of their own (`health_checks.py`, `spawn.py`, `faults.py`); the
pool checks what spans them (a health check's PROXY header needs a server that
gets one; TLS towards servers excludes the PROXY header).

Two things are loaded, not only read, so that a name `check` accepts always
works at run time: the strategy (a custom "module:Class" is imported and
instantiated once, `trioanubis.strategies`) and the client TLS context
(`trioanubis.tls.context`). Both are leaves that import nothing of the config
back; they are imported when a pool needs them, not with this module.
"""

from __future__ import annotations

from typing import Any

from trioanubis.config.checks import check_host_name, check_pattern
from trioanubis.config.faults import parse_fault_table
from trioanubis.config.health_checks import parse_health
from trioanubis.config.model import BACKUP_PRIORITY, DiscoveryConfig, PoolConfig, ServerConfig, TlsClient
from trioanubis.config.node import Node
from trioanubis.config.settings import resolver_of
from trioanubis.config.spawn import parse_spawn

# Bandwidth limits (proxy/rates.py), in bytes per second.
_RATE_KEYS = ("upload_rate", "download_rate", "upload_rate_per_client", "download_rate_per_client")
_POOL_KEYS = (
    "strategy", "servers", "least_time", "connect_timeout", "idle_timeout",
    "half_close_timeout", "retries", "failover_timeout", "eject_after", "eject_for",
    "resolver", "health", "send_proxy", "queue_timeout", "max_queued", "abort_on_close", "spawn", "tls",
    "faults", "balance_factor", "servers_from", "mirror", "mirror_percent", *_RATE_KEYS,
)  # fmt: skip
_SEND_PROXY = ("none", "v1", "v2")


def parse_pool(name: str, node: Node) -> PoolConfig:
    node.check_keys(_POOL_KEYS)
    strategy = node.string("strategy", "round_robin")
    from trioanubis.strategies import StrategyError, check_strategy

    try:
        check_strategy(strategy, node.base)
    except StrategyError as exc:
        raise node.error(str(exc), strategy, "strategy") from None
    servers_from = node.choice("servers_from", "", ("", "etcd"))
    servers, discovery = _parse_servers(node, servers_from)
    health = parse_health(node.child("health"))
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
        balance_factor=_balance_factor(node, strategy),
        least_time=node.choice("least_time", "first_byte", ("first_byte", "connect")),  # type: ignore[arg-type]
        connect_timeout=node.duration("connect_timeout", 3.0),
        idle_timeout=node.duration("idle_timeout", 600.0),
        half_close_timeout=node.duration("half_close_timeout", 60.0),
        retries=node.integer("retries", 2),
        failover_timeout=node.duration("failover_timeout", 0.0),
        eject_after=node.integer("eject_after", 3),
        eject_for=node.duration("eject_for", 10.0),
        resolver=resolver_of(node),
        health=health,
        send_proxy=send_proxy,  # type: ignore[arg-type]
        queue_timeout=node.duration("queue_timeout", 0.0),
        max_queued=node.integer("max_queued", 1000),
        abort_on_close=node.boolean("abort_on_close", True),
        spawn=parse_spawn(node.child("spawn")) if "spawn" in node.data else None,
        tls=_parse_tls_client(node.child("tls")) if "tls" in node.data else None,
        faults=parse_fault_table(node.child("faults", "faults")) if "faults" in node.data else None,
        servers_from=servers_from,
        **_parse_mirror(node),
        upload_rate=node.size("upload_rate"),
        download_rate=node.size("download_rate"),
        upload_rate_per_client=node.size("upload_rate_per_client"),
        download_rate_per_client=node.size("download_rate_per_client"),
    )


def _parse_mirror(node: Node) -> dict[str, Any]:
    """`mirror` as written (load.py tells a pool's name from "host:port") and `mirror_percent`."""
    mirror = node.string("mirror", "")
    if "mirror" in node.data and not mirror.strip():
        raise node.error("must be the name of a [pools.NAME] table or \"host:port\"", mirror, "mirror")
    if "mirror_percent" in node.data and not mirror:
        raise node.error("has no effect without mirror", node.data["mirror_percent"], "mirror_percent")
    return {"mirror": mirror, "mirror_percent": node.fraction("mirror_percent", 100.0)}


def _balance_factor(node: Node, strategy: str) -> float:
    """`balance_factor`: 0 (absent) or 1.0 to 100, and only for a strategy that bounds loads."""
    from trioanubis.strategies import StrategyError, check_balance_factor_for
    from trioanubis.strategies.bounded import check_balance_factor

    factor = node.fraction("balance_factor", 0.0)
    try:
        check_balance_factor(factor)
        check_balance_factor_for(strategy, factor, node.base)
    except (ValueError, StrategyError) as exc:
        raise node.error(str(exc), node.data.get("balance_factor"), "balance_factor") from None
    return factor


def _parse_servers(node: Node, servers_from: str
                   ) -> tuple[tuple[ServerConfig, ...], tuple[DiscoveryConfig, ...]]:  # fmt: skip
    entries = node.data.get("servers")
    if ("spawn" in node.data or servers_from) and entries in (None, []):
        return (), ()  # the replicas, or etcd's keys, are the servers
    if not isinstance(entries, list) or not entries:
        raise node.error("must be a non-empty array of servers", entries, "servers")
    servers: list[ServerConfig] = []
    discovery: list[DiscoveryConfig] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        path = node.key_path(f"servers[{index}]")
        if isinstance(entry, str):
            entry = {"address": entry}
        item = node.nested(entry, path, "pools.*.servers[]")
        if "dns" in item.data or "srv" in item.data:
            discovery.append(_parse_discovery(item))
            continue
        server = parse_server_entry(item)
        if server.name in names:
            raise item.error("duplicate server name in this pool", server.name, "name")
        names.add(server.name)
        servers.append(server)
    return tuple(servers), tuple(discovery)


SERVER_KEYS = ("address", "weight", "name", "max_connections", "send_proxy", "backup", "priority", "faults")


def parse_server_entry(item: Node) -> ServerConfig:
    """One server table of a pool's `servers` (not a dns or srv entry); errors name the key."""
    item.check_keys(SERVER_KEYS)
    address = item.address("address")
    return ServerConfig(
        address=address,
        name=item.string("name", "") or str(address),
        weight=item.integer("weight", 1),
        max_connections=item.integer("max_connections", 0),
        send_proxy=item.choice("send_proxy", "", _SEND_PROXY) if "send_proxy" in item.data else "",  # type: ignore[arg-type]
        priority=_parse_priority(item),
        faults=parse_fault_table(item.child("faults", "faults")) if "faults" in item.data else None,
    )


def parse_server(data: object, path: str, source: str = "admin request") -> ServerConfig:
    """A server entry from elsewhere than a file (the admin's JSON body, the state file), checked as
    the file's are: "host:port" or a table; `path` is its key path in errors ("pools.web.servers[new]").

    A dns or srv entry is refused: discovery is the file's to configure.
    """
    item = Node({"address": data} if isinstance(data, str) else data, path, source, table="pools.*.servers[]")
    if "dns" in item.data or "srv" in item.data:
        raise item.error("dns and srv entries come from the config file only; add a server by its address")
    return parse_server_entry(item)


def _parse_discovery(item: Node) -> DiscoveryConfig:
    item.check_keys(("dns", "srv", "refresh", "weight", "max_connections", "backup", "priority"))
    if "dns" in item.data and "srv" in item.data:
        raise item.error("give either dns or srv, not both")
    refresh = item.duration("refresh", 10.0)
    weight = item.integer("weight", 1)
    max_connections = item.integer("max_connections", 0)
    priority = _parse_priority(item)
    if "srv" in item.data:
        name = item.string("srv", "")
        if not name:
            raise item.error("must be a DNS name like \"_http._tcp.example\"", name, "srv")
        item.checked("srv", name, check_host_name)
        return DiscoveryConfig("srv", name, 0, refresh, weight, max_connections, priority)
    address = item.address("dns")
    return DiscoveryConfig("dns", address.host, address.port, refresh, weight, max_connections, priority)


def _parse_priority(item: Node) -> int:
    """`priority = N` or `backup = true` (priority 1); giving both is ambiguous."""
    if "backup" in item.data and "priority" in item.data:
        raise item.error("give either backup = true or priority = N, not both")
    if item.boolean("backup", False):
        return BACKUP_PRIORITY
    return item.integer("priority", 0)




def _parse_tls_client(node: Node) -> TlsClient:
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
