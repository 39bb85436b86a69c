"""The `[cluster]` table: the etcd a fleet of balancers shares (trioanubis/fleet/).

Theory of operation: `parse_cluster` turns the table into a `ClusterConfig`
and proves what `run` will need: every endpoint is a URL the etcd client
takes (http or https, a host, a port), the prefix is a key prefix that ends
in "/", and the TLS files load (the client context is built here, as a
pool's `tls` is, and dropped: the fleet builds its own from the paths). A
username goes with a password. Nothing connects: an etcd that is down at
`anubis check` or at start is the fleet's to live with, not the config's.

`name` (this instance in the fleet's membership) defaults to "host:pid",
filled in by the fleet when the process starts, not here: the config is
parsed in more than one process (the supervisor and its workers).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from trioanubis.config.model import ClusterConfig
from trioanubis.config.node import Node

_KEYS: Final = ("etcd", "prefix", "name", "ttl", "timeout", "ca", "cert", "key", "username", "password")
# More endpoints than any etcd cluster has members (etcd recommends 3, 5 or 7).
MAX_ENDPOINTS: Final = 16
# A key prefix: printable ASCII without spaces; bounded so keys stay short.
_PREFIX: Final = re.compile(r"/[\x21-\x7e]{0,199}/|/")
# An instance name: what a person reads in `anubis fleet`; one line, no slash (it is a key segment).
_NAME: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def check_endpoint(text: str) -> None:
    """`http://host:port`, `https://host:port` or `host:port`; ValueError saying what is wrong.

    The same rule as the etcd client's `parse_endpoint` (trioanubis.cluster.http), which the
    config package may not import.
    """
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        raise ValueError("only scheme, host and port are allowed")
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:  # (the client would take an explicit 0 for its default, 2379)
        raise ValueError("the port must be in [1, 65535]")
    if not url.hostname:
        raise ValueError("no host")


def parse_cluster(node: Node) -> ClusterConfig:
    node.check_keys(_KEYS)
    endpoints = _endpoints(node)
    prefix = node.string("prefix", "/anubis/")
    if not _PREFIX.fullmatch(prefix):
        raise node.error('must start and end with "/" and hold printable ASCII without spaces '
                         '(at most 200 characters), like "/anubis/"', prefix, "prefix")  # fmt: skip
    name = node.string("name", "")
    if name and not _NAME.fullmatch(name):
        raise node.error("must be 1 to 128 letters, digits and . _ : @ -", name, "name")
    username, password = node.string("username", ""), node.string("password", "")
    if bool(username) != bool(password):
        raise node.error("username and password go together", key="password" if username else "username")
    tls = {key: node.string(key, "") for key in ("ca", "cert", "key")}
    if any(tls.values()):
        _check_tls(node, tls)
    return ClusterConfig(endpoints=endpoints, prefix=prefix, name=name, ttl=node.integer("ttl", 10),
                         timeout=node.duration("timeout", 5.0), username=username, password=password,
                         **tls)  # fmt: skip


def _endpoints(node: Node) -> tuple[str, ...]:
    value = node.data.get("etcd")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_ENDPOINTS:
        raise node.error(f'must be a list of 1 to {MAX_ENDPOINTS} etcd endpoints like '
                         '["http://127.0.0.1:2379"]', value, "etcd")  # fmt: skip
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise node.error("must be a string", item, f"etcd[{index}]")
        try:
            check_endpoint(item)
        except ValueError as exc:
            raise node.error(f"{exc} (like \"http://127.0.0.1:2379\")", item, f"etcd[{index}]") from None
    return tuple(value)


def _check_tls(node: Node, tls: dict[str, str]) -> None:
    from trioanubis.tls.context import TlsConfigError, client_context

    try:
        client_context(verify=True, **tls)
    except TlsConfigError as exc:
        raise node.error(str(exc)) from None
