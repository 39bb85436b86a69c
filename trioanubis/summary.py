"""The one-screen summary `anubis check` prints and `anubis run` logs at start (once: the "ready"
line after it says only how many servers are up)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from trioanubis.config import BACKUP_PRIORITY, Config, FaultConfig, ListenerConfig, PoolConfig
from trioanubis.pool import Pool
from trioanubis.proxy.faults import describe as describe_faults
from trioanubis.proxy.rates import show_rate


def _health(pool: PoolConfig) -> str:
    health = pool.health
    if health.check == "none":
        return "no health check" + _agent(pool)
    what = {"http": f"GET {health.path}", "tcp": "tcp connect"}.get(health.check, f"{health.check} check")
    return f"{what} every {health.interval:g}s, rise {health.rise} fall {health.fall}" + _agent(pool)


def _agent(pool: PoolConfig) -> str:
    """The agent check beside the health check (health/agent.py), if any."""
    agent = pool.health.agent
    if agent is None:
        return ""
    where = f"{agent.host}:{agent.port}" if agent.host else f"port {agent.port}"
    return f", agent on {where} every {agent.interval:g}s (timeout {agent.timeout:g}s)"


def _strategy(pool: PoolConfig) -> str:
    """The strategy, and the bound on loads when a hash strategy has one (strategies/bounded.py)."""
    if not pool.balance_factor:
        return pool.strategy
    return f"{pool.strategy}, balance_factor {pool.balance_factor:g}"


def _priority(priority: int) -> str:
    if not priority:
        return ""
    backup = " (backup)" if priority == BACKUP_PRIORITY else ""
    return f" priority {priority}{backup}"



def _clients(listener: ListenerConfig) -> list[str]:
    """What a listener checks between accept and connect, one line each (admission.py)."""
    lines = []
    if listener.accept_proxy:
        trusted = ", ".join(map(str, listener.proxy_trusted))
        lines.append(f"  accept_proxy from {trusted} (timeout {listener.proxy_timeout:g}s)")
    for what, networks in (("allow", listener.allow), ("deny", listener.deny)):
        if networks:
            lines.append(f"  {what} {', '.join(map(str, networks))}")
    limits = []
    if listener.max_connections_per_client:
        limits.append(f"{listener.max_connections_per_client} connections")
    if listener.rate_per_client:
        limits.append(str(listener.rate_per_client))
    if limits:
        lines.append(f"  per client: {', '.join(limits)}")
    for route in listener.routes:
        alpn = f" (alpn {route.alpn})" if route.alpn else ""
        lines.append(f"  sni {route.sni}{alpn} -> pool {route.pool}")
    if listener.routes:
        lines.append(f"  otherwise -> {'pool ' + listener.pool if listener.pool else 'closed'}; "
                     f"peek_timeout {listener.peek_timeout:g}s")  # fmt: skip
    if listener.tls is not None:
        certs = ", ".join(cert for cert, _ in listener.tls.certificates)
        lines.append(f"  tls termination with {certs}")
    rates = _rates(("upload", listener.upload_rate), ("download", listener.download_rate))
    if rates:
        lines.append(f"  bandwidth per connection: {rates}")
    return lines


def _rates(*limits: tuple[str, int]) -> str:
    return ", ".join(f"{way} {show_rate(rate)}" for way, rate in limits if rate)


def _traffic(pool: PoolConfig) -> list[str]:
    """A pool's bandwidth limits and its mirror (proxy/rates.py, proxy/mirror.py), one line each."""
    lines = []
    per_connection = _rates(("upload", pool.upload_rate), ("download", pool.download_rate))
    per_client = _rates(("upload", pool.upload_rate_per_client), ("download", pool.download_rate_per_client))
    parts = [f"{rates} per {what}" for what, rates in (("connection", per_connection), ("client", per_client))
             if rates]  # fmt: skip
    if parts:
        lines.append(f"  bandwidth: {'; '.join(parts)}")
    if pool.mirror:
        target = f"pool {pool.mirror}" if pool.mirror_address is None else str(pool.mirror_address)
        lines.append(f"  mirror: {pool.mirror_percent:g}% of connections copied to {target} "
                     "(its answers discarded)")  # fmt: skip
    return lines


def _settings(config: Config) -> str:
    s = config.settings
    limit = str(s.max_connections) if s.max_connections else "from ulimit -n"
    delay = f"{s.shutdown_delay:g}s" if s.shutdown_delay else ""
    extra = "".join(f", {key} {value}" for key, value in (("shutdown_delay", delay),
                    ("pid_file", s.pid_file), ("resolver", s.resolver), ("state_file", s.state_file))
                    if value)  # fmt: skip
    workers = "auto" if s.workers == 0 else str(s.workers)
    return (f"settings: drain_timeout {s.drain_timeout:g}s, log_format {s.log_format}, "
            f"access_log {'on' if s.access_log else 'off'}, max_connections {limit}, "
            f"workers {workers}{extra}")  # fmt: skip


def _admin(config: Config) -> str:
    """Where the admin endpoint listens and whether it asks for a token (never the token)."""
    if config.admin is None:
        return "admin: off (no [admin] table)"
    token = "token required" if config.admin.token else "no token"
    return f"admin: {config.admin.bind}, {token}"


def _cluster(config: Config) -> list[str]:
    """The etcd the fleet shares, if any (never the password)."""
    cluster = config.cluster
    if cluster is None:
        return []
    name = cluster.name or "host:pid"
    auth = f", as {cluster.username}" if cluster.username else ""
    tls = ", client certificate" if cluster.cert else ""
    return [f"cluster: etcd {', '.join(cluster.endpoints)}, prefix {cluster.prefix}, instance {name}, "
            f"lease {cluster.ttl}s{auth}{tls}"]


def _faults(faults: FaultConfig | None) -> str:
    """Injected faults in a line's tail ("" when none): they must not go unnoticed."""
    shown = describe_faults(faults if faults is not None and faults.active else None)
    if shown is None:
        return ""
    return "; FAULTS " + " ".join(f"{key}={json.dumps(value).strip(chr(34))}" for key, value in shown.items())


def describe(config: Config, pools: Mapping[str, Pool] | None = None) -> str:
    """Settings, admin, listeners → pools → servers, with live state when `pools` is given."""
    lines = [_settings(config), _admin(config), *_cluster(config)]
    for name, listener in config.listeners.items():
        limit = f", max {listener.max_connections}" if listener.max_connections else ""
        target = f"pool {listener.pool}" if not listener.routes else "routes by sni"
        lines.append(f"listener {name}: {listener.bind} -> {target}{limit}")
        lines += _clients(listener)
    for name, pc in config.pools.items():
        proxy = f", send_proxy {pc.send_proxy}" if pc.send_proxy != "none" else ""
        if pc.tls is not None:
            proxy += ", tls" + ("" if pc.tls.verify else " (not verified)")
        lines.append(f"pool {name}: {_strategy(pc)}; {_health(pc)}; connect_timeout "
                     f"{pc.connect_timeout:g}s, idle_timeout {pc.idle_timeout:g}s, "
                     f"retries {pc.retries}{proxy}{_faults(pc.faults)}")  # fmt: skip
        lines += _traffic(pc)
        live = pools[name].servers if pools else None
        if live is not None:
            for server in live:
                ewma = f"{server.ewma * 1000:.1f}ms" if server.ewma is not None else "-"
                lines.append(f"  server {server.name}: {server.address} weight {server.weight}"
                             f"{_priority(server.priority)} {server.state} active {server.active} "
                             f"ewma {ewma}")  # fmt: skip
        else:
            for sc in pc.servers:
                limit = f" max_connections {sc.max_connections}" if sc.max_connections else ""
                lines.append(f"  server {sc.name}: {sc.address} weight {sc.weight}{limit}"
                             f"{_priority(sc.priority)}{_faults(sc.faults)}")  # fmt: skip
        if pc.spawn is not None and live is None:
            watch = f", rolled when {len(pc.spawn.watch)} watched patterns change" if pc.spawn.watch else ""
            lines.append(f"  {pc.spawn.replicas} replicas of: {' '.join(pc.spawn.command)}{watch}")
        if pc.queue_timeout:
            lines.append(f"  clients held up to {pc.queue_timeout:g}s while no server can take them "
                         f"(at most {pc.max_queued})")  # fmt: skip
        if pc.servers_from:
            lines.append(f"  servers from etcd keys {config.cluster.prefix if config.cluster else ''}"
                         f"pools/{name}/servers/")  # fmt: skip
        for d in pc.discovery:
            what = f"SRV {d.name}" if d.kind == "srv" else f"DNS {d.name}:{d.port}"
            lines.append(f"  servers from {what}, refreshed every {d.refresh:g}s")
    return "\n".join(lines)


def servers_up(pools: Mapping[str, Pool]) -> str:
    """What the "ready" line adds to the summary logged at start: how many servers are up."""
    parts = [f"pool {name}: {sum(s.healthy for s in pool.servers)}/{len(pool.servers)} servers up"
             for name, pool in pools.items()]  # fmt: skip
    return "\n".join(parts) or "no pools"
