"""Which pool a TLS client goes to, by the server name (and ALPN) of its ClientHello. Sans-IO.

Theory of operation: a `RouteTable` is built once per listener config from
its `routes`; `pick(server_name, alpn)` returns the pool name or "" (the
listener's fallback `pool` then applies). Matching, as HAProxy, nginx's
`map` with `hostnames` and Traefik's `HostSNI` users expect:

- names compare case-insensitively (the parser lower-cases what the client
  sent; patterns are lower-cased here);
- an exact name beats every wildcard; `*.example.com` matches one or more
  labels before `example.com` (`a.example.com`, `a.b.example.com`) but not
  `example.com` itself; of several wildcards the longest suffix wins;
- a route with `alpn` matches only clients that offer that protocol, and for
  the same name it beats a route without one; otherwise the first route
  listed wins.

A `Route` is a config record; `trioanubis.config.checks.check_pattern` validates each `sni`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import final

from trioanubis.config import Route


@final
class RouteTable:
    """The routes of one listener, indexed for a pick that costs one lookup per label of the name."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.exact: dict[str, list[Route]] = {}
        self.wildcard: dict[str, list[Route]] = {}  # suffix without "*." → routes
        for route in routes:
            if route.sni.startswith("*."):
                self.wildcard.setdefault(route.sni[2:], []).append(route)
            else:
                self.exact.setdefault(route.sni, []).append(route)

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcard)

    def pick(self, server_name: str, alpn: tuple[str, ...] = ()) -> str:
        """The pool for a client that sent `server_name` and offered `alpn`; "" when no route matches."""
        if not server_name:
            return ""
        routes = self.exact.get(server_name)
        if routes is not None:
            found = _first_match(routes, alpn)
            if found:
                return found
        rest = server_name
        while "." in rest:  # "a.b.example.com" → "b.example.com" → "example.com" → "com"
            rest = rest.split(".", 1)[1]
            routes = self.wildcard.get(rest)
            if routes is not None:
                found = _first_match(routes, alpn)
                if found:
                    return found
        return ""


def _first_match(routes: list[Route], alpn: tuple[str, ...]) -> str:
    for route in routes:
        if route.alpn and route.alpn in alpn:
            return route.pool
    for route in routes:
        if not route.alpn:
            return route.pool
    return ""
