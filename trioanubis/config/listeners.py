"""The `[listeners.NAME]` tables: where clients connect, who may, and where they go.

Theory of operation: `parse_listener` turns one table into a `ListenerConfig`:
the bind address, the pool (or SNI `routes` to several), the limits, the
client screening options (`accept_proxy`, allow/deny, per-client limits and
rate) and `tls`. A listener's certificates are loaded here, through
`trioanubis.tls.context`, so that `anubis check` reports a bad key or a
missing file and a reload never swaps in a context that cannot load. That
module is a leaf (it imports only `trioanubis.errors`), so loading it here
points at nothing that imports the config back. Whether the named pools exist
and whether binds overlap is checked once all tables are read (`load.py`).
"""

from __future__ import annotations

from typing import Any

from trioanubis.config.checks import check_pattern
from trioanubis.config.model import ListenerConfig, Route, TlsServer
from trioanubis.config.node import Node

_LISTENER_CLIENT_KEYS = (
    "accept_proxy", "proxy_trusted", "proxy_timeout", "allow", "deny", "max_connections_per_client",
    "rate_per_client",
)  # fmt: skip


def parse_listener(name: str, node: Node) -> ListenerConfig:
    node.check_keys(("bind", "pool", "max_connections", "backlog", "routes", "peek_timeout", "tls",
                     "upload_rate", "download_rate", *_LISTENER_CLIENT_KEYS))  # fmt: skip
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
        backlog=node.integer("backlog", 0),
        routes=routes,
        peek_timeout=node.duration("peek_timeout", 5.0),
        tls=_parse_tls_server(node) if "tls" in node.data else None,
        upload_rate=node.size("upload_rate"),
        download_rate=node.size("download_rate"),
        **_parse_client_options(node),
    )


def _parse_routes(node: Node) -> tuple[Route, ...]:
    """`routes = [{ sni = "api.example.com", pool = "api", alpn = "h2" }, …]`; each error names its index."""
    value = node.data.get("routes", [])
    if not isinstance(value, list):
        raise node.error("must be an array of { sni = \"…\", pool = \"…\" } tables", value, "routes")
    routes = []
    for index, entry in enumerate(value):
        item = node.nested(entry, node.key_path(f"routes[{index}]"), "listeners.*.routes[]")
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


def _parse_tls_server(node: Node) -> TlsServer:
    """`tls = { cert = "…", key = "…" }`, or an array of them (the first is the default)."""
    from trioanubis.tls.context import TlsConfigError, server_context

    value = node.data["tls"]
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise node.error("must be { cert = \"…\", key = \"…\" } or a non-empty array of them", value, "tls")
    pairs = []
    for index, entry in enumerate(entries):
        path = node.key_path(f"tls[{index}]" if isinstance(value, list) else "tls")
        item = node.nested(entry, path, "listeners.*.tls")
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


def _parse_client_options(node: Node) -> dict[str, Any]:
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
        "proxy_timeout": node.duration("proxy_timeout", 3.0),
        "allow": node.networks("allow"),
        "deny": node.networks("deny"),
        "max_connections_per_client": node.integer("max_connections_per_client", 0),
        "rate_per_client": node.rate("rate_per_client"),
    }
