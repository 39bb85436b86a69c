"""The `[settings]` and `[admin]` tables: process-wide options and the operator's endpoint.

Theory of operation: one parser per table, each taking the table's `Node` and
returning its frozen record. Nothing is opened or bound here; the admin's
`token_file` is the one file read, each load, so that a reload rotates the
token. `resolver_of` is shared with pools, which may name their own resolver.
"""

from __future__ import annotations

import os
import re
import select
from pathlib import Path

from trioanubis.config.model import IO_CHOICES, AdminConfig, IoName, Settings
from trioanubis.config.node import Node
from trioanubis.config.values import parse_resolver


def epoll_available() -> bool:
    """Whether this platform has epoll (Linux): `io = "epoll"` is refused elsewhere."""
    return hasattr(select, "epoll")


def parse_settings(node: Node) -> Settings:
    node.check_keys(
        ("drain_timeout", "log_format", "access_log", "pid_file", "resolver", "max_connections", "io",
         "workers", "shutdown_delay", "state_file")
    )
    return Settings(
        drain_timeout=node.duration("drain_timeout", 30.0),
        shutdown_delay=node.duration("shutdown_delay", 0.0),
        log_format=node.choice("log_format", "text", ("text", "json")),  # type: ignore[arg-type]
        access_log=node.boolean("access_log", True),
        pid_file=node.string("pid_file", ""),
        resolver=resolver_of(node),
        max_connections=node.integer("max_connections", 0),
        io=_io(node),
        workers=_workers(node),
        state_file=_state_file(node),
    )


def _workers(node: Node) -> int:
    """`workers`: a count (ranges.py), or "auto" (stored as 0, resolved at run time)."""
    if node.data.get("workers") == "auto":
        return 0
    if isinstance(node.data.get("workers"), str):
        value = node.data["workers"]
        raise node.error(f'must be "auto" or {node.range("workers").describe()}', value, "workers")
    return node.integer("workers", 1)


def _state_file(node: Node) -> str:
    """`state_file`: a path (relative to the config's directory) in a directory this process may write.

    The file itself may be absent, unreadable or corrupt: that is reported and ignored at start
    (state_file.py), never fatal; a directory that cannot take it would lose every change, so it
    is refused here.
    """
    value = node.string("state_file", "")
    if not value:
        return ""
    try:
        path = node.base / value
        if path.is_dir():
            raise node.error("is a directory; name a file in it", value, "state_file")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
            raise node.error(f"its directory {str(path.parent)!r} does not exist or is not writable",
                             value, "state_file")  # fmt: skip
    except (OSError, ValueError) as exc:  # a NUL in it, a name too long
        raise node.error(f"is not a usable path ({exc})", value, "state_file") from None
    return str(path.absolute())


def _io(node: Node) -> IoName:
    value = node.choice("io", "auto", IO_CHOICES)
    if value == "epoll" and not epoll_available():
        raise node.error("this platform has no epoll; use 'auto' or 'portable'", value, "io")
    return value  # type: ignore[return-value]


def resolver_of(node: Node) -> str:
    """A resolver as "ip:port" (the port defaults to 53), or "" for the system's resolvers."""
    value = node.string("resolver", "")
    if not value:
        return ""
    try:
        return str(parse_resolver(value))
    except ValueError as exc:
        raise node.error(str(exc), value, "resolver") from None




# Visible ASCII: what an Authorization header can carry; anything else never matches.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# A token file bigger than this is the wrong file.
MAX_TOKEN_BYTES = 4096


def parse_admin(node: Node) -> AdminConfig:
    node.check_keys(("bind", "token", "token_file", "hosts"))
    token, token_file = node.string("token", ""), node.string("token_file", "")
    if token and token_file:
        raise node.error("set token or token_file, not both", key="token_file")
    if token_file:
        token = _read_token(node, token_file)
    elif token and not _TOKEN.fullmatch(token):
        raise node.error("must be visible ASCII characters, no spaces", key="token")  # never echo it
    return AdminConfig(
        bind=node.address("bind", allow_any_host=True, default="127.0.0.1:9900"),
        token=token,
        token_file=token_file,
        hosts=_admin_hosts(node),
    )


# A DNS name as a Host header carries it: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*", re.ASCII)
# More names than any deployment has: a longer list is a mistake (a pasted file?).
MAX_ADMIN_HOSTS = 64


def _admin_hosts(node: Node) -> tuple[str, ...]:
    """`[admin] hosts`: DNS names, lower-cased; each bad entry named by its index (`hosts[2]`)."""
    value = node.data.get("hosts", [])
    if not isinstance(value, list) or len(value) > MAX_ADMIN_HOSTS:
        raise node.error(f'must be a list of at most {MAX_ADMIN_HOSTS} host names like ["lb1.internal"]',
                         value, "hosts")  # fmt: skip
    for index, item in enumerate(value):
        name = item.lower() if isinstance(item, str) else ""
        if len(name) > 253 or not _HOST_NAME.fullmatch(name):
            raise node.error("must be a DNS name without a port (IP addresses and localhost are "
                             "always accepted; write an international name in its xn-- form)",
                             item, f"hosts[{index}]")  # fmt: skip
    return tuple(dict.fromkeys(item.lower() for item in value))


def _read_token(node: Node, path: str) -> str:
    """The token in `path` (a mounted Kubernetes Secret, say), surrounding whitespace removed."""
    try:
        if not Path(path).is_file():
            raise node.error("must name a readable regular file", path, "token_file")
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise node.error(f"cannot read it: {exc.strerror or exc}", path, "token_file") from None
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_TOKEN_BYTES or not _TOKEN.fullmatch(token):
        raise node.error(f"must hold one token of visible ASCII characters (at most {MAX_TOKEN_BYTES} "
                         "bytes)", path, "token_file")  # fmt: skip
    return token
