"""What the admin endpoint shows: `/stats` as JSON and `/metrics` in Prometheus text format.

Both are pure functions of a balancer's `View` (view.py); they read counters and
never change them. `/metrics` ends with `anubis_build_info` (version, Python,
readiness backend as labels) and the standard `process_*` metrics of the
process that answers (process.py); with workers, each process's are labelled
with `worker` (see process.py for why they are not added up).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from trioanubis import __version__, compiled
from trioanubis.ops.accesslog import log_dropped
from trioanubis.ops.process import process_lines
from trioanubis.proxy import mirror, rates
from trioanubis.proxy.faults import describe

if TYPE_CHECKING:
    from trioanubis.ops.view import AdminCounters, View
    from trioanubis.pool import Pool, Server
    from trioanubis.proxy.listener import Listener
    from trioanubis.spawn import Spawner


def server_stats(server: Server) -> dict[str, Any]:
    return {
        "name": server.name,
        "address": str(server.address),
        "state": server.state,
        "weight": server.weight,
        "effective_weight": server.effective_weight,
        "max_connections": server.max_connections,
        "priority": server.priority,
        "active": server.active,
        "total": server.total,
        "bytes_in": server.bytes_in,
        "bytes_out": server.bytes_out,
        "connect_failures": server.connect_failures,
        "last_check": server.last_check,
        "ewma_ms": None if server.ewma is None else round(server.ewma * 1000, 3),
        "faults": describe(server.faults),
        "faults_applied": dict(sorted(server.faults_applied.items())),
        **agent_stats(server),
    }


# ------------------------------------------------------------ agent checks (health/agent.py)


def agent_stats(server: Server) -> dict[str, Any]:
    """A server's agent check for /stats; nothing when it has none (the document is as before)."""
    status = server.agent
    if status is None:
        return {}
    return {"agent": {
        "said": status.said,  # the last line, or why there was none
        "result": status.result,
        "state": status.state,  # what the agent holds the server in: up, drain, maint, down, fail, stopped
        "percent": status.percent,
        "weight": server.weight * status.percent / 100,  # the weight it asks for (before slow start)
        "checks": status.counts(),
    }}  # fmt: skip


def _agent_lines(rows: list[tuple[dict[str, str], Server]]) -> list[str]:
    """`anubis_agent_checks_total{pool,server,result}`, for the servers that have an agent."""
    agents = [(labels, s.agent) for labels, s in rows if s.agent is not None]
    if not agents:
        return []
    lines = list(_family("agent_checks_total", "counter", "Agent checks by result (ok, invalid, error)."))
    for labels, status in agents:
        for result, count in status.counts().items():
            lines.append(f"anubis_agent_checks_total{_labels(**labels, result=result)} {count}")
    return lines


# ------------------------------------------------------------ mirroring and bandwidth limits


def _mirror_lines(pools: list[Pool]) -> list[str]:
    """The mirrors' counters, for the pools that mirror (or did, before a reload)."""
    shown = [(p.name, m) for p in pools if (m := mirror.shown(p)) is not None]
    lines = list(_family("mirror_connections_total", "counter", "Connections sampled for a mirror copy."))
    lines += [f"anubis_mirror_connections_total{_labels(pool=name)} {m.connections}" for name, m in shown]
    lines += _family("mirror_bytes_total", "counter", "Client bytes delivered to a mirror.")
    lines += [f"anubis_mirror_bytes_total{_labels(pool=name)} {m.bytes}" for name, m in shown]
    lines += _family("mirror_dropped_total", "counter",
                     "Mirror copies given up (the primary went on), by reason.")  # fmt: skip
    lines += [f"anubis_mirror_dropped_total{_labels(pool=name, reason=reason)} {count}"
              for name, m in shown for reason, count in m.dropped.items()]  # fmt: skip
    return lines


def _rate_lines(pools: list[Pool]) -> list[str]:
    """The bandwidth limits' counters, for the pools that limit (or did, or whose listeners do)."""
    shown = [(p.name, r) for p in pools if (r := rates.shown(p)) is not None]
    lines = list(_family("rate_limited_connections_total", "counter", "Connections with a bandwidth limit."))
    lines += [f"anubis_rate_limited_connections_total{_labels(pool=name)} {r.connections}"
              for name, r in shown]  # fmt: skip
    for family, help_text, field in (
        ("rate_limited_bytes_total", "Bytes that went through a bandwidth limit, by direction.", "bytes"),
        ("rate_limit_wait_seconds_total", "Seconds connections waited for a bandwidth limit, by direction.",
         "waited"),
    ):  # fmt: skip
        lines += _family(family, "counter", help_text)
        lines += [f"anubis_{family}{_labels(pool=name, direction=way)} {_decimal(value)}" for name, r in shown
                  for way, value in zip(rates.DIRECTIONS, getattr(r, field), strict=True)]  # fmt: skip
    lines += _family("rate_limit_tracked_clients", "gauge", "Clients with a per-client bandwidth budget.")
    lines += [f"anubis_rate_limit_tracked_clients{_labels(pool=name)} {len(r.budgets)}"
              for name, r in shown if r.budgets is not None]  # fmt: skip
    return lines


def _decimal(value: float) -> str:
    """A counter as a plain decimal: 3, 0.25 (never 1e-05)."""
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def pool_stats(pool: Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "strategy": pool.config.strategy,
        "serving_priority": pool.serving_priority,
        "no_server": pool.no_server,
        "all_full": pool.all_full,
        "queued": len(pool.held),
        "queue_held": pool.held.held,
        "queue_timeouts": pool.held.timeouts,
        "queue_full": pool.held.full,
        "servers": [server_stats(s) for s in pool.servers],
        "retired": [server_stats(s) for s in pool.retired],
        **mirror.stats(pool),
        **rates.stats(pool),
    }


def stats(view: View) -> dict[str, Any]:
    """The `/stats` document."""
    return {
        "ready": view.is_ready(),
        "draining": view.draining,
        "active": view.limits.active,
        "max_connections": view.limits.max_connections,
        "endings": dict(sorted(view.endings.items())),
        "reloads": view.reloads,
        "reload_failures": view.reload_failures,
        "log_dropped": log_dropped(),
        "listeners": [
            {
                "name": listener.name,
                "bind": str(listener.bound or listener.config.bind),
                "pool": listener.config.pool,
                "accepted": listener.accepted,
                "active": listener.active,
                "rejected": listener.rejected,
                "accept_overloads": listener.overloads,
                "internal_errors": listener.internal_errors,
                **listener.admission.stats(),
                **({"tls": dict(listener.tls_counts)} if listener.routes or listener.config.tls else {}),
            }
            for listener in view.listeners.values()
        ],
        "pools": [pool_stats(pool) for pool in view.pools.values()],
        "replicas": {name: spawner_stats(s) for name, s in view.spawners.items()},
        "admin": None if view.admin is None else admin_stats(view.admin),
        "cluster": view.cluster_stats(),
    }


def spawner_stats(spawner: Spawner) -> dict[str, Any]:
    """A pool's replicas: the processes behind its servers, and its rolling restarts."""
    return {
        "rolls": spawner.rolls,
        "roll_failures": spawner.roll_failures,
        "last_roll_seconds": round(spawner.last_roll_seconds, 3),
        "replicas": [
            {"name": r.name, "pid": r.pid, "port": r.port, "restarts": r.restarts, "state": r.server.state}
            for r in spawner.replicas
        ],
    }


def _spawn_lines(view: View) -> list[str]:
    spawners = view.spawners.items()
    lines = list(_family("replica_restarts_total", "counter",
                         "Times a spawned replica exited and was started again."))  # fmt: skip
    lines += [f"anubis_replica_restarts_total{_labels(pool=name, replica=r.name)} {r.restarts}"
              for name, s in spawners for r in s.replicas]  # fmt: skip
    lines += _family("rolling_restarts_total", "counter", "Rolling restarts of a pool's replicas, by result.")
    for name, s in spawners:
        lines.append(f"anubis_rolling_restarts_total{_labels(pool=name, result='done')} {s.rolls}")
        lines.append(f"anubis_rolling_restarts_total{_labels(pool=name, result='stopped')} {s.roll_failures}")
    return lines


def admin_stats(admin: AdminCounters) -> dict[str, int]:
    return {name: value for name, _, value in _admin_rows(admin)}


def _admin_rows(admin: AdminCounters) -> list[tuple[str, str, int]]:
    return [
        ("internal_errors", "Admin requests that hit a bug (answered 500, never a process exit).",
         admin.internal_errors),
        ("evicted", "Admin connections closed to give their slot to a newcomer.", admin.evicted),
        ("rejected", "Admin connections refused because every slot was busy with authorised work.",
         admin.rejected),
        ("accept_overloads", "Admin accepts that failed for lack of descriptors or memory.",
         admin.accept_overloads),
        ("misdirected", "Admin requests refused (421) for a Host that is not an IP, localhost or in "
         "[admin] hosts.", admin.misdirected),
        ("cross_origin", "Admin changes refused (403) because a browser sent them from another origin.",
         admin.cross_origin),
    ]  # fmt: skip


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str) -> Iterator[str]:
    yield f"# HELP anubis_{name} {help_text}"
    yield f"# TYPE anubis_{name} {kind}"


def _server_rows(view: View) -> Iterator[tuple[dict[str, str], Server]]:
    for pool in view.pools.values():
        for server in [*pool.servers, *pool.retired]:
            yield {"pool": pool.name, "server": server.name}, server


SERVER_METRICS = (
    ("server_active_connections", "gauge", "Connections to a server, open or connecting.", "active"),
    ("server_connections_total", "counter", "Connections sent to a server.", "total"),
    ("server_bytes_in_total", "counter", "Bytes relayed from clients to a server.", "bytes_in"),
    ("server_bytes_out_total", "counter", "Bytes relayed from a server to clients.", "bytes_out"),
    ("server_connect_failures_total", "counter", "Failed connects to a server.", "connect_failures"),
    ("server_weight", "gauge", "A server's configured weight.", "weight"),
    ("server_effective_weight", "gauge", "A server's weight now (slow start).", "effective_weight"),
    ("server_priority", "gauge", "A server's priority group (0 first, backups 1).", "priority"),
)


def _admission_metrics(listeners: list[Listener]) -> Iterator[str]:
    yield from _family("listener_refused_total", "counter",
                       "Clients closed before any server was contacted, by reason.")  # fmt: skip
    for x in listeners:
        for reason, count in x.admission.refused.items():
            yield f"anubis_listener_refused_total{_labels(listener=x.name, reason=reason)} {count}"
    yield from _family("listener_tracked_clients", "gauge",
                       "Clients with per-client state (open connections, rate buckets).")  # fmt: skip
    for x in listeners:
        yield f"anubis_listener_tracked_clients{_labels(listener=x.name)} {len(x.admission.clients)}"
    tls = [x for x in listeners if x.routes or x.config.tls]
    if tls:
        yield from _family("listener_tls_total", "counter",
                           "Openings of listeners with routes or tls, by result.")  # fmt: skip
    for x in tls:
        for result, count in x.tls_counts.items():
            yield f"anubis_listener_tls_total{_labels(listener=x.name, result=result)} {count}"


# The fleet's series (fleet/fleet.py `Fleet.status`): name, kind, help, the /stats field.
CLUSTER_METRICS = (
    ("cluster_connected", "gauge", "1 while this instance reaches etcd, else 0.", "connected"),
    ("cluster_reconnects_total", "counter", "Times etcd was reached again after it was lost.", "reconnects"),
    ("cluster_bad_values_total", "counter", "etcd values ignored as malformed (each key logged once).",
     "bad_values"),
    ("cluster_commands_applied_total", "counter", "Commands from etcd applied here.", "applied"),
    ("cluster_commands_not_applied_total", "counter", "Commands from etcd this instance refused.",
     "not_applied"),
    ("cluster_commands_queued", "gauge", "Commands made here that wait for etcd.", "queued"),
    ("cluster_instances", "gauge", "Instances registered in the fleet, as last seen.", "instances"),
)  # fmt: skip


def _cluster_lines(status: dict[str, Any] | None) -> list[str]:
    if status is None:
        return []
    lines: list[str] = []
    for name, kind, help_text, field in CLUSTER_METRICS:
        lines += _family(name, kind, help_text)
        lines.append(f"anubis_{name} {int(status[field])}")
    return lines


def prometheus(view: View, worker: str | None = None) -> str:
    """The `/metrics` document (text exposition format 0.0.4); `worker` (a worker's id, or
    "supervisor") labels this process's `process_*` lines, for the supervisor's merge."""
    lines: list[str] = []
    listeners = list(view.listeners.values())
    for name, kind, help_text, attribute in (
        ("listener_connections_total", "counter", "Connections accepted by a listener.", "accepted"),
        ("listener_active_connections", "gauge", "Open connections of a listener.", "active"),
        ("listener_rejected_total", "counter", "Clients closed at once by a connection limit.",
         "rejected"),
    ):  # fmt: skip
        lines += _family(name, kind, help_text)
        lines += [f"anubis_{name}{_labels(listener=x.name)} {getattr(x, attribute)}" for x in listeners]
    lines += _admission_metrics(listeners)
    rows = list(_server_rows(view))
    for name, kind, help_text, attribute in SERVER_METRICS:
        lines += _family(name, kind, help_text)
        lines += [f"anubis_{name}{_labels(**labels)} {getattr(s, attribute)}" for labels, s in rows]
    lines += _family("server_up", "gauge", "1 if a server takes new connections, else 0.")
    lines += [f"anubis_server_up{_labels(**labels)} {int(s.state == 'up')}" for labels, s in rows]
    lines += _family("health_checks_total", "counter", "Health checks by result.")
    for labels, s in rows:
        lines.append(f"anubis_health_checks_total{_labels(**labels, result='pass')} {s.checks_passed}")
        lines.append(f"anubis_health_checks_total{_labels(**labels, result='fail')} {s.checks_failed}")
        lines.append(f"anubis_health_checks_total{_labels(**labels, result='skipped')} {s.checks_skipped}")
    lines += _agent_lines(rows)
    lines += _family("faults_applied_total", "counter", "Injected faults that acted, by server and fault.")
    for labels, s in rows:
        for fault, count in sorted(s.faults_applied.items()):
            lines.append(f"anubis_faults_applied_total{_labels(**labels, fault=fault)} {count}")
    lines += _family("pool_no_server_total", "counter", "Clients closed because no server could take them.")
    pools = list(view.pools.values())
    lines += [f"anubis_pool_no_server_total{_labels(pool=p.name)} {p.no_server}" for p in pools]
    lines += _family("pool_serving_priority", "gauge",
                     "The priority group taking new connections (absent when none can).")  # fmt: skip
    lines += [f"anubis_pool_serving_priority{_labels(pool=p.name)} {p.serving_priority}"
              for p in pools if p.serving_priority is not None]  # fmt: skip
    for name, kind, help_text, held in (
        ("pool_queued_clients", "gauge", "Clients held now, waiting for a server (queue_timeout).",
         lambda p: len(p.held)),
        ("pool_queue_timeouts_total", "counter", "Held clients closed after queue_timeout.",
         lambda p: p.held.timeouts),
        ("pool_queue_full_total", "counter", "Clients closed at once because max_queued were held.",
         lambda p: p.held.full),
    ):  # fmt: skip
        lines += _family(name, kind, help_text)
        lines += [f"anubis_{name}{_labels(pool=p.name)} {held(p)}" for p in pools]
    lines += _mirror_lines(pools) + _rate_lines(pools)
    lines += _spawn_lines(view)
    lines += _family("connection_duration_seconds", "histogram", "How long connections lasted.")
    for pool in pools:
        histogram = pool.durations
        for bound, count in histogram.cumulative():
            lines.append(f"anubis_connection_duration_seconds_bucket"
                         f"{_labels(pool=pool.name, le=repr(bound))} {count}")  # fmt: skip
        lines.append(f"anubis_connection_duration_seconds_bucket"
                     f"{_labels(pool=pool.name, le='+Inf')} {histogram.count}")  # fmt: skip
        lines.append(f"anubis_connection_duration_seconds_sum{_labels(pool=pool.name)} {histogram.total}")
        lines.append(f"anubis_connection_duration_seconds_count{_labels(pool=pool.name)} {histogram.count}")
    lines += _family("connections_ended_total", "counter", "Finished connections by how they ended.")
    for end, count in sorted(view.endings.items()):
        lines.append(f"anubis_connections_ended_total{_labels(end=end)} {count}")
    if view.admin is not None:
        for name, help_text, value in _admin_rows(view.admin):
            lines += _family(f"admin_{name}_total", "counter", help_text)
            lines.append(f"anubis_admin_{name}_total {value}")
    lines += _cluster_lines(view.cluster_stats())
    lines += _family("reloads_total", "counter",
                     "Config reloads: applied, or failed (rejected, or a listener that could not move).")
    lines.append(f"anubis_reloads_total{_labels(result='applied')} {view.reloads}")
    lines.append(f"anubis_reloads_total{_labels(result='failed')} {view.reload_failures}")
    lines += _family("log_dropped_total", "counter", "Log lines dropped because stderr could not keep up.")
    lines.append(f"anubis_log_dropped_total {log_dropped()}")
    lines += _family("build_info", "gauge",
                     "What runs: anubis and Python versions, readiness backend, compiled or pure build.")
    build = _labels(version=__version__, python=platform.python_version(), io=view.poller.caps.name,
                    build="compiled" if compiled() else "pure")
    lines.append(f"anubis_build_info{build} 1")
    lines += process_lines("" if worker is None else _labels(worker=worker))
    return "\n".join(lines) + "\n"
