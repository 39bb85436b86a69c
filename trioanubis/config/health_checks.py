"""A pool's `[pools.NAME.health]` table: how and how often each server is checked.

Theory of operation: `parse_health` turns the table into a `HealthConfig`.
Beyond types and ranges it refuses what the check would fail on at run time:
a `path` or `host` h11 would not put in a request head (`checks.py`), and
send/expect keys the check kind does not use (a preset that parses its
protocol, a server that speaks first). `send` and `expect` are decoded from
their escapes here and bounded, so the health checker only ever sees bytes.
"""

from __future__ import annotations

from typing import Any

from trioanubis.config.checks import check_header_host, check_header_path, check_host_name, ip_address_or_none
from trioanubis.config.model import (
    EXPECT_BYTES,
    HEALTH_CHECKS,
    PARSED,
    PROTOCOL_CHECKS,
    SERVER_FIRST,
    AgentConfig,
    HealthConfig,
)
from trioanubis.config.node import Node
from trioanubis.config.values import compile_regex, decode_escapes

# Protocol checks: the most a check may send (a request, not a payload).
MAX_SEND = 65536


def parse_health(node: Node) -> HealthConfig:
    node.check_keys(
        ("check", "path", "host", "expect_status", "expect_body", "interval", "timeout",
         "rise", "fall", "slow_start", "send_proxy", "agent", *_PROBE_KEYS)
    )  # fmt: skip
    path = node.checked("path", node.string("path", "/health"), check_header_path)
    host = node.string("host", "")  # "": the server's own address
    if host:
        node.checked("host", host, check_header_host)
    check = node.choice("check", "tcp", HEALTH_CHECKS)
    return HealthConfig(
        check=check,  # type: ignore[arg-type]
        path=path,
        host=host,
        expect_status=node.integer("expect_status", 200),
        expect_body=node.string("expect_body", ""),
        interval=node.duration("interval", 2.0),
        timeout=node.duration("timeout", 1.0),
        rise=node.integer("rise", 2),
        fall=node.integer("fall", 3),
        slow_start=node.duration("slow_start", 0.0),
        send_proxy=node.boolean("send_proxy", False),
        agent=_parse_agent(node.child("agent")) if "agent" in node.data else None,
        **_parse_probe(node, check),
    )


# What an agent is sent: a word or a line, not a payload.
MAX_AGENT_SEND = 1024


def _parse_agent(node: Node) -> AgentConfig:
    """`agent = { port = N, host = "", interval = "2s", timeout = "1s", send = "" }`."""
    node.check_keys(("port", "host", "interval", "timeout", "send"))
    if "port" not in node.data:
        raise node.error("is required (the agent's TCP port)", key="port")
    host = node.string("host", "")
    if host and ip_address_or_none(host) is None:
        node.checked("host", host, check_host_name)
    interval = node.duration("interval", 2.0)
    timeout = node.duration("timeout", min(1.0, interval))
    if timeout > interval:
        raise node.error(f"must not exceed interval ({interval:g}s)", node.data.get("timeout"), "timeout")
    return AgentConfig(port=node.integer("port", 0), host=host, interval=interval, timeout=timeout,
                       send=_escaped(node, "send", MAX_AGENT_SEND))  # fmt: skip


_PROBE_KEYS = ("send", "expect", "expect_regex", "expect_bytes", "user")


def _parse_probe(node: Node, check: str) -> dict[str, Any]:
    """The send/expect keys of a protocol check, checked against what its kind allows."""
    given = [key for key in _PROBE_KEYS if key in node.data]
    if check not in PROTOCOL_CHECKS:
        if given:
            raise node.error(f"is only used by the checks {', '.join(PROTOCOL_CHECKS)}",
                             node.data[given[0]], given[0])  # fmt: skip
        return {}
    for key in given:
        if key in ("send", "expect", "expect_regex") and check in PARSED:
            raise node.error(f"check = {check!r} speaks its protocol itself; use "
                             f"check = \"send_expect\" for a conversation of your own",
                             node.data[key], key)  # fmt: skip
        if key == "send" and check in SERVER_FIRST:
            raise node.error(f"check = {check!r} waits for the server to speak first; use "
                             f"check = \"send_expect\" to send", node.data[key], key)  # fmt: skip
        if key == "user" and check != "postgres":
            raise node.error("is only used by check = \"postgres\"", node.data[key], key)
    limit = node.integer("expect_bytes", EXPECT_BYTES)
    send = _escaped(node, "send", MAX_SEND) if "send" in node.data else None
    expect = _escaped(node, "expect", limit)
    regex = node.string("expect_regex", "")
    _check_expectation(node, check, send, expect, regex)
    return {"send": send, "expect": expect, "expect_regex": regex, "expect_bytes": limit,
            "user": _pg_user(node)}  # fmt: skip


def _escaped(node: Node, key: str, limit: int) -> bytes:
    text = node.string(key, "")
    try:
        data = decode_escapes(text)
    except ValueError as exc:
        raise node.error(str(exc), text, key) from None
    if len(data) > limit:
        raise node.error(f"is {len(data)} bytes, more than the {limit} allowed here", text, key)
    return data


def _check_expectation(node: Node, check: str, send: bytes | None, expect: bytes, regex: str) -> None:
    if "expect" in node.data and not expect:
        raise node.error("must not be empty (it would match any reply)", "", "expect")
    if expect and regex:
        raise node.error("give either expect or expect_regex, not both", regex, "expect_regex")
    if regex:
        try:
            compile_regex(regex)
        except ValueError as exc:
            raise node.error(str(exc), regex, "expect_regex") from None
    if check in ("send_expect", "banner") and not (expect or regex):
        raise node.error(f"check = {check!r} needs expect or expect_regex", key="expect")
    if check == "redis" and (expect or regex) and send is None:
        key = "expect" if expect else "expect_regex"
        raise node.error("replaces the preset's reply, so give send too (the preset sends PING)",
                         node.data[key], key)  # fmt: skip


def _pg_user(node: Node) -> str:
    user = node.string("user", "postgres")
    if not user or "\x00" in user or len(user.encode()) > 63:
        raise node.error("must be a PostgreSQL role name (1 to 63 bytes, no NUL)", user, "user")
    return user
