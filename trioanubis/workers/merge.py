"""Pure pieces of the supervisor: the state it pushes to workers and the sums of their counters.

Theory of operation: the supervisor owns the one health view (its own pools,
checked by its own health tasks). `snapshot` turns that view into a message
(per server: up, draining, weight, effective weight); `apply_snapshot` makes
a worker's pools match it, quietly (the supervisor logged each transition
once) and touching `Pool.changed` only when something differs. Servers are
matched by name and address, so a server a worker's discovery found a moment
before the supervisor's simply waits for the next snapshot.

`sum_stats` and `sum_metrics` fold the workers' `/stats` documents and
`/metrics` texts into one: counters and open connections add up; state that
every worker shares (up, weights) is taken from the supervisor's own view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trioanubis.config import MAX_WEIGHT  # the bound on a weight, in the file and the admin API
from trioanubis.pool import Pool, Server

ServerKey = tuple[str, str]  # name, "host:port"

# /stats fields of a server and a listener that add up across workers.
SERVER_SUMS = ("active", "total", "bytes_in", "bytes_out", "connect_failures")
LISTENER_SUMS = ("accepted", "active", "rejected", "accept_overloads", "internal_errors")
POOL_SUMS = ("no_server", "all_full")
# A pool's nested /stats tables whose counters add up too (proxy/mirror.py, proxy/rates.py); a counter
# may be a number or a table of numbers (drops by reason, bytes by direction).
POOL_NESTED_SUMS = {
    "mirror": ("connections", "bytes", "dropped"),
    "bandwidth": ("limited_connections", "bytes", "waited_seconds", "tracked_clients"),
}
# Prometheus series that are the same in every worker (pushed state, build info) or the
# supervisor's alone (reloads): taken from the supervisor's view, not added up. (The process_*
# series need no rule: each process labels its own with `worker`, so no two are the same series.)
SHARED_GAUGES = ("anubis_server_weight", "anubis_server_effective_weight", "anubis_server_up",
                 "anubis_reloads_total", "anubis_build_info")  # fmt: skip


def key_of(server: Server) -> ServerKey:
    return server.name, str(server.address)


def snapshot(pools: Mapping[str, Pool], seq: int) -> dict[str, Any]:
    """The supervisor's view as a `state` message."""
    return {
        "t": "state",
        "seq": seq,
        "pools": {
            name: [
                [s.name, str(s.address), s.healthy, s.draining, s.weight, s.effective_weight]
                for s in pool.servers
            ]
            for name, pool in pools.items()
        },
    }


def apply_snapshot(pools: Mapping[str, Pool], message: Mapping[str, Any], held: Iterable[ServerKey]) -> None:
    """Make `pools` match a `state` message; servers in `held` are not brought back up by it.

    Raises ValueError/TypeError/KeyError on a malformed message (the caller logs it).
    """
    keep_down = set(held)
    for name, rows in message["pools"].items():
        pool = pools.get(name)
        if pool is None:
            continue
        wanted = {(str(r[0]), str(r[1])): r for r in rows}
        changed = False
        for server in pool.servers:
            row = wanted.get(key_of(server))
            if row is not None:
                changed |= _apply_row(pool, server, row, key_of(server) in keep_down)
        if changed:
            pool.changed()


def _apply_row(pool: Pool, server: Server, row: Sequence[Any], keep_down: bool) -> bool:
    healthy, draining = bool(row[2]), bool(row[3])
    weight, effective = int(row[4]), float(row[5])
    if not 0 <= effective <= weight <= MAX_WEIGHT:  # NaN fails this too
        raise ValueError(f"server {row[0]!r}: weight {weight} / effective weight {effective} out of range")
    if keep_down and healthy:
        healthy = False
    return pool.follow(server, healthy, draining, weight, effective)


# ----------------------------------------------------------------- /stats


def sum_stats(view: dict[str, Any], workers: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The view's `/stats` document with every worker's counters added in, plus `workers`."""
    docs = [doc for _, doc in workers]
    out = dict(view)
    out["active"] = sum(int(d.get("active", 0)) for d in docs)
    out["max_connections"] = sum(int(d.get("max_connections", 0)) for d in docs)
    out["endings"] = _sum_maps(d.get("endings", {}) for d in docs)
    out["log_dropped"] = int(view.get("log_dropped", 0)) + sum(int(d.get("log_dropped", 0)) for d in docs)
    out["listeners"] = _sum_rows([d.get("listeners", []) for d in docs], LISTENER_SUMS)
    out["pools"] = [_sum_pool(pool, docs) for pool in view.get("pools", [])]
    out["ready"] = bool(view.get("ready")) and bool(docs) and all(d.get("ready") for d in docs)
    return out


def _sum_maps(maps: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in maps:
        for key, value in mapping.items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))


def _sum_rows(tables: Sequence[Sequence[dict[str, Any]]], fields: Sequence[str]) -> list[dict[str, Any]]:
    """Rows matched by name across workers; `fields` added, the rest from the first worker."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for row in table:
            name = str(row.get("name"))
            if name not in merged:
                merged[name] = dict(row)
                continue
            for field in fields:
                merged[name][field] = merged[name].get(field, 0) + row.get(field, 0)
    return list(merged.values())


def _sum_pool(pool: dict[str, Any], docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    theirs = [p for d in docs for p in d.get("pools", []) if p.get("name") == pool.get("name")]
    out = dict(pool)
    for field in POOL_SUMS:
        out[field] = sum(int(p.get(field, 0)) for p in theirs)
    for table, fields in POOL_NESTED_SUMS.items():
        parts = [p[table] for p in theirs if isinstance(p.get(table), dict)]
        if parts:
            base = pool[table] if isinstance(pool.get(table), dict) else parts[0]
            sums = {field: _sum_counter(part.get(field, 0) for part in parts) for field in fields}
            out[table] = {**base, **sums}
    for part in ("servers", "retired"):
        out[part] = [_sum_server(s, [w for p in theirs for w in p.get(part, [])])
                     for s in pool.get(part, [])]  # fmt: skip
    retired = {s["name"] for s in out["retired"]}
    out["retired"] += [s for s in _sum_rows([p.get("retired", []) for p in theirs], SERVER_SUMS)
                       if s.get("name") not in retired]  # fmt: skip
    return out


def _sum_counter(values: Iterable[Any]) -> Any:
    """Numbers added; tables of numbers added key by key (anything else counts as nothing)."""
    items = list(values)
    if any(isinstance(v, dict) for v in items):
        total: dict[str, Any] = {}
        for value in items:
            for key, inner in (value.items() if isinstance(value, dict) else ()):
                total[key] = _sum_counter([total.get(key, 0), inner])
        return total
    return sum(v for v in items if isinstance(v, int | float) and not isinstance(v, bool))


def _sum_server(server: dict[str, Any], theirs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The view's server (state, weights, last check) with the workers' counters added."""
    mine = [w for w in theirs if (w.get("name"), w.get("address")) == (server["name"], server["address"])]
    out = dict(server)
    for field in SERVER_SUMS:
        out[field] = sum(int(w.get(field, 0)) for w in mine)
    samples = [float(w["ewma_ms"]) for w in mine if w.get("ewma_ms") is not None]
    out["ewma_ms"] = round(sum(samples) / len(samples), 3) if samples else None
    return out


# ---------------------------------------------------------------- /metrics


def sum_metrics(texts: Sequence[str]) -> str:
    """Prometheus texts folded into one: samples with the same name and labels added up.

    The first text is the supervisor's view: it alone decides the gauges every
    worker shares (`SHARED_GAUGES`). Samples stay grouped under their family's
    `# HELP`/`# TYPE` lines, families in the order first seen.
    """
    headers: dict[str, list[str]] = {}
    series: dict[str, dict[str, float]] = {}
    for index, text in enumerate(texts):
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split(" ")[2] if line.count(" ") >= 2 else ""
                header = headers.setdefault(family, [])
                if line not in header:
                    header.append(line)
                series.setdefault(family, {})
                continue
            name, _, number = line.rpartition(" ")
            try:
                value = float(number)
            except ValueError:
                continue
            samples = series.setdefault(family, {})
            headers.setdefault(family, [])
            if index == 0 or not name.startswith(SHARED_GAUGES):
                samples[name] = samples.get(name, 0.0) + value
            else:
                samples.setdefault(name, value)
    lines: list[str] = []
    for family, header in headers.items():
        lines += header
        lines += [f"{name} {_number(value)}" for name, value in series[family].items()]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1 << 53 else repr(value)
