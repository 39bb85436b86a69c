"""The one-screen summary `anubis check` prints and `anubis run` logs at start."""

from __future__ import annotations

from collections.abc import Mapping

from trioanubis.config import Config, PoolConfig
from trioanubis.pool import Pool


def _health(pool: PoolConfig) -> str:
    health = pool.health
    if health.check == "none":
        return "no health check"
    what = f"GET {health.path}" if health.check == "http" else "tcp connect"
    return f"{what} every {health.interval:g}s, rise {health.rise} fall {health.fall}"


def describe(config: Config, pools: Mapping[str, Pool] | None = None) -> str:
    """Listeners → pools → servers, with live state and latency when `pools` is given."""
    lines = []
    for name, listener in config.listeners.items():
        limit = f", max {listener.max_connections}" if listener.max_connections else ""
        lines.append(f"listener {name}: {listener.bind} -> pool {listener.pool}{limit}")
    for name, pc in config.pools.items():
        lines.append(f"pool {name}: {pc.strategy}; {_health(pc)}; connect_timeout "
                     f"{pc.connect_timeout:g}s, idle_timeout {pc.idle_timeout:g}s, "
                     f"retries {pc.retries}")  # fmt: skip
        live = pools[name].servers if pools else None
        if live is not None:
            for server in live:
                ewma = f"{server.ewma * 1000:.1f}ms" if server.ewma is not None else "-"
                lines.append(f"  server {server.name}: {server.address} weight {server.weight} "
                             f"{server.state} active {server.active} ewma {ewma}")  # fmt: skip
        else:
            for sc in pc.servers:
                limit = f" max_connections {sc.max_connections}" if sc.max_connections else ""
                lines.append(f"  server {sc.name}: {sc.address} weight {sc.weight}{limit}")
        if pc.spawn is not None and live is None:
            watch = f", rolled when {len(pc.spawn.watch)} watched patterns change" if pc.spawn.watch else ""
            lines.append(f"  {pc.spawn.replicas} replicas of: {' '.join(pc.spawn.command)}{watch}")
        if pc.queue_timeout:
            lines.append(f"  clients held up to {pc.queue_timeout:g}s while no server can take them "
                         f"(at most {pc.max_queued})")  # fmt: skip
        for d in pc.discovery:
            what = f"SRV {d.name}" if d.kind == "srv" else f"DNS {d.name}:{d.port}"
            lines.append(f"  servers from {what}, refreshed every {d.refresh:g}s")
    return "\n".join(lines)
