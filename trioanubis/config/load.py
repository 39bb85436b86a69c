"""Configuration: TOML text → frozen, typed records.

Theory of operation: `load_config` reads a file, `parse_config_text` parses
its TOML and `parse_config` turns the mapping into a `Config`, one section
parser per kind of table (`settings.py`, `listeners.py`, `pools.py` and the
pool's nested tables), then checks what spans tables: that the pools the
listeners name exist, and that no two listening sockets overlap. All of it is
pure apart from reading the file (a regular file of at most
`MAX_CONFIG_BYTES`), loading TLS contexts and importing a custom strategy;
nothing here resolves names or opens sockets. Validation is the only gate:
what it accepts, `run` and a reload can apply without failing on a value.

Every rejection is a `ConfigError` whose message has the shape
``FILE: KEY.PATH: what is wrong, got VALUE`` (`node.py`), so the operator can
find the line without a traceback.

The schema is a contract: keys are added, never renamed.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from trioanubis.config.checks import find_bind_overlap
from trioanubis.config.cluster import parse_cluster
from trioanubis.config.listeners import parse_listener
from trioanubis.config.model import AdminConfig, Config, ListenerConfig, PoolConfig
from trioanubis.config.node import Node, show_value
from trioanubis.config.pools import parse_pool
from trioanubis.config.settings import parse_admin, parse_settings
from trioanubis.config.values import parse_address
from trioanubis.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# A config file is a page of text; anything larger is a mistake (or /dev/zero).
MAX_CONFIG_BYTES: Final = 1 << 20


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every failure is a ConfigError naming the file.

    A custom strategy ("module:Class") is looked for beside the file first.
    """
    source = str(path)
    try:
        raw = read_config_file(path)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    return parse_config_text(raw.decode("utf-8", errors="replace"), source, Path(path).parent)


def _config_dir(source: str, base_dir: str | Path | None) -> Path:
    if base_dir is not None:
        return Path(base_dir).resolve()
    try:  # `source` names a file, or says where the config came from ("anubis proxy")
        path = Path(source)
        return path.resolve().parent if path.is_file() else Path.cwd()
    except (OSError, ValueError):  # not a path at all (too long, a NUL in it)
        return Path.cwd()


def read_config_file(path: str | Path) -> bytes:
    """At most MAX_CONFIG_BYTES of a regular file; OSError with a strerror otherwise.

    The file is opened without blocking (a FIFO would wait for a writer) and
    checked to be a regular file before a byte is read, so a device such as
    /dev/zero or a pipe is refused instead of read forever.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise OSError(0, f"larger than {MAX_CONFIG_BYTES // 1024} KiB")
    return raw


def parse_config_text(
    text: str, source: str = "<config>", base_dir: str | Path | None = None
) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise ConfigError(f"{source}: invalid TOML: a number too long to read ({exc})") from None
    except RecursionError:  # the TOML parser recurses once per nested array or table
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    return parse_config(data, source, base_dir)


def parse_config(
    data: Mapping[str, Any], source: str = "<config>", base_dir: str | Path | None = None
) -> Config:
    """Validate a TOML mapping and build the frozen config records.

    Relative paths (a custom strategy's module, a spawn table's cwd and watch
    patterns) start at `base_dir`, else the directory of `source` when it names
    a file (the worker supervisor and its workers parse the file's text), else
    the current directory (`anubis proxy`).
    """
    top = Node(data, "", source, _config_dir(source, base_dir))
    top.check_keys(("settings", "listeners", "pools", "admin", "cluster"))
    settings = parse_settings(top.child("settings"))
    pools_node = top.child("pools")
    pools = {
        name: parse_pool(name, pools_node.child(name, "pools.*")) for name in pools_node.data
    }
    pools = {name: _resolve_mirror(pools_node.child(name, "pools.*"), pool, pools)
             for name, pool in pools.items()}  # fmt: skip
    listeners_node = top.child("listeners")
    if not listeners_node.data:
        raise top.error("at least one [listeners.NAME] table is required")
    listeners = {}
    for name in listeners_node.data:
        listener = parse_listener(name, listeners_node.child(name, "listeners.*"))
        named = [(f"{name}.pool", listener.pool)] if listener.pool else []
        named += [(f"{name}.routes[{i}].pool", route.pool) for i, route in enumerate(listener.routes)]
        for key, pool_name in named:
            if pool_name not in pools:
                known = ", ".join(sorted(pools)) or "none are defined"
                raise listeners_node.error(
                    f"names pool {pool_name!r}, which does not exist (pools: {known})", key=key
                )
        listeners[name] = listener
    admin = parse_admin(top.child("admin")) if "admin" in data else None
    _check_binds(top, listeners, admin)
    cluster = parse_cluster(top.child("cluster")) if "cluster" in data else None
    for name, pool in pools.items():
        if pool.servers_from == "etcd" and cluster is None:
            raise pools_node.error('servers_from = "etcd" needs a [cluster] table naming the etcd endpoints',
                                   "etcd", f"{name}.servers_from")  # fmt: skip
    return Config(listeners, pools, settings, admin, source, cluster)


def _resolve_mirror(node: Node, pool: PoolConfig, pools: Mapping[str, PoolConfig]) -> PoolConfig:
    """A pool's `mirror`: the name of another pool (it wins), else a "host:port" (`mirror_address`).

    A mirror pool's servers are reached in plain TCP (with its PROXY header if it sends one), so a
    pool that speaks TLS to its servers cannot be one; a pool mirroring to itself doubles its load.
    """
    target = pool.mirror
    if not target:
        return pool
    if target in pools:
        if target == pool.name:
            raise node.error("names this pool itself: mirror to another pool or a \"host:port\"",
                             target, "mirror")  # fmt: skip
        if pools[target].tls is not None:
            raise node.error(f"names pool {target!r}, which speaks TLS to its servers: a mirror "
                             "is reached in plain TCP", target, "mirror")  # fmt: skip
        return pool
    try:
        address = parse_address(target)
    except ValueError as exc:
        known = ", ".join(sorted(set(pools) - {pool.name})) or "no other is defined"
        raise node.error(f"names no pool ({known}) and is not an address: {exc}", target,
                         "mirror") from None  # fmt: skip
    return replace(pool, mirror_address=address)


def _check_binds(
    top: Node, listeners: Mapping[str, ListenerConfig], admin: AdminConfig | None
) -> None:
    """Refuse two listening sockets (the admin's too) whose addresses overlap on one port."""
    binds = {f"listeners.{name}.bind": lc.bind for name, lc in listeners.items()}
    if admin is not None:
        binds["admin.bind"] = admin.bind
    clash = find_bind_overlap((key, a.host, a.port) for key, a in binds.items())
    if clash is not None:
        first, second, why = clash
        raise top.error(
            f"overlaps {first} = {show_value(str(binds[first]))} on port {binds[second].port}: {why}",
            str(binds[second]),
            key=second,
        )


def proxy_config(
    listen: str,
    servers: list[str],
    strategy: str,
    *,
    queue_timeout: str | float = "10s",
    spawn: list[str] | None = None,
    replicas: int = 1,
    watch: list[str] | None = None,
    ports: str | None = None,
    tls: tuple[str, str] | None = None,
) -> Config:
    """The config `anubis proxy LISTEN SERVER...` stands for; errors name the argument.

    Unlike a config file's pools, the proxy holds clients for `queue_timeout`
    while no server is up (a developer restarting the one server behind it).
    """
    pool: dict[str, object] = {
        "strategy": strategy, "servers": servers, "health": {"check": "tcp"},
        "queue_timeout": queue_timeout,
    }  # fmt: skip
    if spawn is not None:
        pool["spawn"] = {"command": spawn, "replicas": replicas, "watch": watch or [],
                         **({"ports": ports} if ports is not None else {})}  # fmt: skip
    elif watch:
        raise ConfigError("anubis proxy: --watch restarts spawned replicas: it needs --spawn")
    elif ports is not None:
        raise ConfigError("anubis proxy: --ports gives spawned replicas their ports: it needs --spawn")
    listener: dict[str, Any] = {"bind": listen, "pool": "proxy"}
    if tls is not None:  # --tls: clients speak TLS to a certificate made for localhost
        listener["tls"] = {"cert": tls[0], "key": tls[1]}
    data = {"listeners": {"proxy": listener}, "pools": {"proxy": pool}}
    return parse_config(data, "anubis proxy")
