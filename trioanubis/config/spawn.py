"""A pool's `[pools.NAME.spawn]` table: replicas the balancer starts itself (spawn.py).

Theory of operation: `parse_spawn` turns the table into a `SpawnConfig` with
every path made absolute against the config file's directory, so a reload
from another working directory means the same files. The program must exist
now (looked up in the table's PATH and cwd), so `anubis check` catches a typo
rather than the first roll; nothing is started here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil

from trioanubis.config.model import SpawnConfig
from trioanubis.config.node import Node

_SPAWN_KEYS = ("command", "replicas", "cwd", "env", "watch", "host", "ports", "start_timeout", "stop_grace")
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_NOT_A_RANGE = 'must be a range of ports, "FIRST-LAST" (e.g. "4000-4099")'


def parse_spawn(node: Node) -> SpawnConfig:
    node.check_keys(_SPAWN_KEYS)
    base = node.base
    cwd = str(base / node.string("cwd", "."))
    if not os.path.isdir(cwd):
        raise node.error("must name an existing directory", node.data.get("cwd", "."), "cwd")
    env = _string_table(node, "env")
    replicas = node.integer("replicas", 1)
    return SpawnConfig(
        command=_command(node, cwd, dict(env)),
        replicas=replicas,
        cwd=cwd,
        env=env,
        watch=tuple(str(base / pattern) for pattern in _string_list(node, "watch")),
        host=_loopback_host(node),
        ports=_port_range(node, replicas),
        start_timeout=node.duration("start_timeout", 30.0),
        stop_grace=node.duration("stop_grace", 5.0),
    )


def _string_list(node: Node, key: str) -> tuple[str, ...]:
    value = node.data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
        raise node.error("must be an array of non-empty strings", value, key)
    return tuple(value)


def _string_table(node: Node, key: str) -> tuple[tuple[str, str], ...]:
    table = node.child(key)
    pairs = []
    for name, value in table.data.items():
        if not name or "=" in name or "\0" in name:
            raise table.error("must be an environment variable name", name, name)
        if not isinstance(value, str) or "\0" in value:
            raise table.error("must be a string", value, name)
        pairs.append((name, value))
    return tuple(pairs)


def _command(node: Node, cwd: str, env: dict[str, str]) -> tuple[str, ...]:
    """The argument vector; its program must exist now, so `anubis check` catches a typo."""
    command = _string_list(node, "command")
    if not command:
        raise node.error("must be a non-empty array: the program and its arguments", [], "command")
    program = command[0].replace("{port}", "0")
    path = env.get("PATH", os.environ.get("PATH", os.defpath))
    found = shutil.which(program, path=path) if os.sep not in program \
        else shutil.which(os.path.join(cwd, program))  # fmt: skip
    if found is None:
        raise node.error("names no executable program (looked in PATH and cwd)", command[0], "command[0]")
    return command


def port_range(text: str, replicas: int, replicas_named: str = "replicas") -> tuple[int, int]:
    """ "FIRST-LAST" (1 to 65535, FIRST <= LAST) as the pair, with room for `replicas` and a
    rolling restart's new replica; ValueError naming what is wrong (`replicas_named`: how the
    count was given, e.g. "--replicas 3")."""
    match = _PORT_RANGE.fullmatch(text)
    if match is None:
        raise ValueError(_NOT_A_RANGE)
    first, last = int(match[1]), int(match[2])
    if not 1 <= first <= last <= 65535:
        raise ValueError("must be ports 1 to 65535, the first no higher than the last")
    if last - first + 1 < replicas + 1:
        raise ValueError(f"must hold at least {replicas + 1} ports ({replicas_named}, and one more for "
                         "a rolling restart's new replica)")  # fmt: skip
    return first, last


def _port_range(node: Node, replicas: int) -> tuple[int, int] | None:
    """`ports`: where the replicas' ports are taken from. A rolling restart runs one replica more
    than `replicas` (the new one starts before the old one stops), so the range holds that many."""
    value = node.data.get("ports")
    if value is None:
        return None
    if not isinstance(value, str):
        raise node.error(_NOT_A_RANGE, value, "ports")
    try:
        return port_range(value, replicas)
    except ValueError as exc:
        raise node.error(str(exc), value, "ports") from None


def _loopback_host(node: Node) -> str:
    host = node.string("host", "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise node.error("must be an IP address the replicas listen on", host, "host") from None
    return host
