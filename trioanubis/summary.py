"""The one-screen summary `anubis check` prints and `anubis run` logs at start."""

from __future__ import annotations

import json
from collections.abc import Mapping

from trioanubis.config import Config, FaultConfig, ListenerConfig, PoolConfig
from trioanubis.faults import describe as describe_faults
from trioanubis.pool import Pool


def _health(pool: PoolConfig) -> str:
    health = pool.health
    if health.check == "none":
        return "no health check"
    what = f"GET {health.path}" if health.check == "http" else "tcp connect"
    return f"{what} every {health.interval:g}s, rise {health.rise} fall {health.fall}"


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
    return lines


def _faults(faults: FaultConfig | None) -> str:
    """Injected faults in a line's tail ("" when none): they must not go unnoticed."""
    shown = describe_faults(faults if faults is not None and faults.active else None)
    if shown is None:
        return ""
    return "; FAULTS " + " ".join(f"{key}={json.dumps(value).strip(chr(34))}" for key, value in shown.items())


def describe(config: Config, pools: Mapping[str, Pool] | None = None) -> str:
    """Listeners → pools → servers, with live state and latency when `pools` is given."""
    lines = []
    for name, listener in config.listeners.items():
        limit = f", max {listener.max_connections}" if listener.max_connections else ""
        lines.append(f"listener {name}: {listener.bind} -> pool {listener.pool}{limit}")
        lines += _clients(listener)
    for name, pc in config.pools.items():
        proxy = f", send_proxy {pc.send_proxy}" if pc.send_proxy != "none" else ""
        lines.append(f"pool {name}: {pc.strategy}; {_health(pc)}; connect_timeout "
                     f"{pc.connect_timeout:g}s, idle_timeout {pc.idle_timeout:g}s, "
                     f"retries {pc.retries}{proxy}{_faults(pc.faults)}")  # fmt: skip
        live = pools[name].servers if pools else None
        if live is not None:
            for server in live:
                ewma = f"{server.ewma * 1000:.1f}ms" if server.ewma is not None else "-"
                lines.append(f"  server {server.name}: {server.address} weight {server.weight} "
                             f"{server.state} active {server.active} ewma {ewma}")  # fmt: skip
        else:
            for sc in pc.servers:
                limit = f" max_connections {sc.max_connections}" if sc.max_connections else ""
                faults = _faults(sc.faults)
                lines.append(f"  server {sc.name}: {sc.address} weight {sc.weight}{limit}{faults}")
        for d in pc.discovery:
            what = f"SRV {d.name}" if d.kind == "srv" else f"DNS {d.name}:{d.port}"
            lines.append(f"  servers from {what}, refreshed every {d.refresh:g}s")
    return "\n".join(lines)
