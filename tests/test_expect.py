"""The sans-IO side of protocol checks: presets, escapes, matchers, fuzzed replies."""

from __future__ import annotations

import contextlib
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioanubis.config import ConfigError, decode_escapes, parse_config
from trioanubis.health.expect import (
    PG_TERMINATE,
    Matcher,
    MySQLHandshake,
    PostgresReply,
    pg_startup,
    plan_for,
    show,
)
from trioanubis.health.probe import plan_of


def feed_all(matcher: Matcher, *chunks: bytes, close: bool = False) -> tuple[bool, str] | None:
    for chunk in chunks:
        verdict = matcher.feed(chunk)
        if verdict is not None:
            return verdict.ok, verdict.reason
    if close:
        verdict = matcher.eof()
        return verdict.ok, verdict.reason
    return None


def pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", 4 + len(body)) + body


def mysql_packet(payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


MYSQL_HANDSHAKE = mysql_packet(b"\x0a8.0.36\x00" + b"\x01\x00\x00\x00" + b"abcdefgh\x00" + b"\xff\xf7")
MYSQL_TOO_MANY = mysql_packet(b"\xff\x10\x04Too many connections")
MYSQL_BLOCKED = mysql_packet(b"\xff\x69\x04#HY000Host '10.0.0.1' is blocked")
PG_AUTH_OK = pg_message(b"R", b"\x00\x00\x00\x00")
PG_MD5 = pg_message(b"R", b"\x00\x00\x00\x05salt")
PG_PARAM = pg_message(b"S", b"server_version\x0017.2\x00")
PG_NO_ROLE = pg_message(b"E", b"SFATAL\x00C28000\x00Mrole \"x\" does not exist\x00\x00")
PG_STARTING = pg_message(b"E", b"SFATAL\x00VFATAL\x00C57P03\x00Mthe database system is starting up\x00\x00")


# ------------------------------------------------------------------ presets


def test_redis_preset_pings_and_decides_on_the_first_line() -> None:
    plan = plan_for("redis")
    assert plan.send == b"PING\r\n"
    assert feed_all(plan.matcher(), b"+PO", b"NG\r\n") == (True, "got '+PONG'")
    ok, reason = feed_all(plan.matcher(), b"-LOADING Redis is loading the dataset in memory\r\n") or ()
    assert not ok and reason == "expected '+PONG', got '-LOADING Redis is loading the dataset in memory'"
    # wrong from its first bytes: decided without waiting for the line's end or the timeout
    assert feed_all(plan.matcher(), b"-ERR") == (False, "expected '+PONG', got '-ERR'")


def test_redis_with_its_own_conversation_matches_anywhere_in_the_reply() -> None:
    plan = plan_for("redis", send=b"AUTH pw\r\nPING\r\n", expect=b"+PONG")
    assert plan.send == b"AUTH pw\r\nPING\r\n"
    assert feed_all(plan.matcher(), b"+OK\r\n", b"+PONG\r\n") == (True, "got '+PONG'")


def test_smtp_preset_wants_a_220_banner() -> None:
    plan = plan_for("smtp")
    assert plan.send == b""
    assert feed_all(plan.matcher(), b"220 mail.example ESMTP\r\n") == (True, "got '220 mail.example ESMTP'")
    assert feed_all(plan.matcher(), b"554 no service\r\n") == (False, "expected '220', got '554 no service'")
    assert feed_all(plan.matcher(), b"22", close=True) == (False, "expected '220' before the server "
                                                                    "closed, got '22'")


def test_postgres_preset_builds_a_startup_and_reads_the_answer() -> None:
    plan = plan_for("postgres", user="monitor")
    length, version = struct.unpack_from("!II", plan.send)
    assert length == len(plan.send) and version == 196608
    assert b"user\x00monitor\x00" in plan.send and plan.send.endswith(b"\x00\x00")
    assert plan.farewell == PG_TERMINATE
    assert feed_all(plan.matcher(), PG_AUTH_OK) is None  # the role may still be refused
    ready = PG_AUTH_OK + PG_PARAM + pg_message(b"K", b"12345678") + pg_message(b"Z", b"I")
    assert feed_all(plan.matcher(), ready[:11], ready[11:]) == (True, "ready for query")
    assert feed_all(plan.matcher(), PG_AUTH_OK + PG_NO_ROLE) == (
        False, 'postgres refused the startup: 28000 role "x" does not exist')  # fmt: skip
    assert feed_all(plan.matcher(), PG_MD5[:6], PG_MD5[6:]) == (True, "authentication request 5")
    assert feed_all(plan.matcher(), pg_message(b"Z", b"I")) == (True, "ready for query")
    notice = pg_message(b"N", b"SNOTICE\x00Mhi\x00\x00")
    assert feed_all(plan.matcher(), notice + PG_MD5) == (True, "authentication request 5")
    assert feed_all(plan.matcher(), PG_STARTING) == (
        False, "postgres refused the startup: 57P03 the database system is starting up")  # fmt: skip
    assert feed_all(plan.matcher(), b"HTTP/1.1 400 Bad Request\r\n")[0] is False  # type: ignore[index]


def test_pg_startup_with_a_database() -> None:
    assert b"database\x00app\x00" in pg_startup("u", "app")


def test_mysql_preset_reads_the_handshake() -> None:
    plan = plan_for("mysql")
    assert plan.send == b""
    assert feed_all(plan.matcher(), MYSQL_HANDSHAKE[:7], MYSQL_HANDSHAKE[7:]) == (
        True, "mysql handshake, server '8.0.36'")  # fmt: skip
    assert feed_all(plan.matcher(), MYSQL_TOO_MANY) == (False, "mysql refused: 1040 Too many connections")
    assert feed_all(plan.matcher(), MYSQL_BLOCKED) == (
        False, "mysql refused: 1129 Host '10.0.0.1' is blocked")  # fmt: skip
    assert feed_all(plan.matcher(), mysql_packet(b"\x09old"))[0] is False  # type: ignore[index]


def test_send_expect_and_banner() -> None:
    plan = plan_for("send_expect", send=b"HELLO\n", expect=b"OK")
    assert plan.send == b"HELLO\n"
    assert feed_all(plan.matcher(), b"xxO", b"K") == (True, "got 'OK'")
    assert feed_all(plan.matcher(), b"NO", close=True) == (False, "expected 'OK' before the server "
                                                                  "closed, got 'NO'")
    banner = plan_for("banner", expect_regex=r"^SSH-2\.0-")
    assert banner.send == b""
    assert feed_all(banner.matcher(), b"SSH-2.0-OpenSSH_9.6\r\n") == (True, "got 'SSH-2.0-'")
    with pytest.raises(ValueError):
        plan_for("banner")


def test_the_bound_ends_the_check() -> None:
    matcher = plan_for("send_expect", expect=b"never", expect_bytes=8).matcher()
    assert matcher.feed(b"0123") is None and matcher.room == 4
    verdict = matcher.feed(b"456789abc")  # beyond the room: ignored
    assert verdict is not None and not verdict.ok
    assert verdict.reason == "expected 'never' within 8 bytes, got '01234567'"
    assert bytes(matcher.received) == b"01234567"


def test_timeout_reason_quotes_what_arrived() -> None:
    matcher = plan_for("redis").matcher()
    assert matcher.feed(b"+PON") is None
    assert matcher.timed_out().reason == "timeout: expected '+PONG', got '+PON'"
    assert plan_for("redis").matcher().timed_out().reason == "timeout: expected '+PONG', got nothing"


# ------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("PING\\r\\n", b"PING\r\n"),
        ("\\x00\\xFF\\t\\0\\\\", b"\x00\xff\t\x00\\"),
        ("é", "é".encode()),
        ("PING\r\n", b"PING\r\n"),  # already decoded by a TOML basic string
    ],
)
def test_decode_escapes(text: str, data: bytes) -> None:
    assert decode_escapes(text) == data


@pytest.mark.parametrize("text", ["\\x4", "\\xZZ", "\\q", "tail\\"])
def test_bad_escapes_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        decode_escapes(text)


def test_show_is_printable_and_truncated() -> None:
    assert show(b"-LOADING Redis is loading", limit=17) == "'-LOADING Redis is…'"
    assert show(b"\x00\xff\r\n\\") == "'\\x00\\xff\\r\\n\\\\'"
    assert show(b"") == "nothing"


# ------------------------------------------------------------------ fuzz

replies = st.lists(st.binary(max_size=300), max_size=12)
bounds = st.integers(min_value=1, max_value=600)


def every_matcher(limit: int) -> list[Matcher]:
    plans = [
        plan_for("redis", expect_bytes=limit),
        plan_for("redis", send=b"PING\r\n", expect=b"+PONG", expect_bytes=limit),
        plan_for("smtp", expect_bytes=limit),
        plan_for("postgres", expect_bytes=limit),
        plan_for("mysql", expect_bytes=limit),
        plan_for("banner", expect_regex=r"^220[ -](.*)+$", expect_bytes=limit),
        plan_for("send_expect", send=b"x", expect=b"\x00\xff", expect_bytes=limit),
    ]
    return [plan.matcher() for plan in plans]


def structured_replies() -> st.SearchStrategy[list[bytes]]:
    """Replies that look like the real protocols, cut anywhere, so the parsers get deep."""
    pg = st.builds(pg_message, st.sampled_from([b"R", b"E", b"N", b"v", b"Z", b"S"]), st.binary(max_size=80))
    lengths = st.binary(min_size=5, max_size=5).map(lambda b: b"R" + b[1:])  # absurd lengths
    mysql = st.builds(mysql_packet, st.binary(max_size=80))
    text = st.sampled_from([b"+PONG\r\n", b"-LOADING x\r\n", b"220 ok\r\n", b"554 no\r\n", b"\n"])
    parts = st.lists(st.one_of(pg, lengths, mysql, text, st.binary(max_size=40)), max_size=4)

    def cut(pieces: list[bytes], points: list[int]) -> list[bytes]:
        data = b"".join(pieces)
        edges = sorted({min(p, len(data)) for p in points} | {0, len(data)})
        return [data[a:b] for a, b in itertools.pairwise(edges)]

    return st.builds(cut, parts, st.lists(st.integers(min_value=0, max_value=400), max_size=6))


def check_bounded(matcher: Matcher, chunks: list[bytes], close: bool) -> None:
    """Feed as the I/O shell does: never more than `room`; a full buffer always has a verdict."""
    for chunk in chunks:
        piece = chunk[: matcher.room]
        if not piece:
            continue
        verdict = matcher.feed(piece)
        assert len(matcher.received) <= matcher.limit
        if verdict is not None:
            assert verdict.reason.isprintable()
            return
        assert matcher.room > 0  # a matcher with no room left must have decided
    final = matcher.eof() if close else matcher.timed_out()
    assert final.reason.isprintable()


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(replies, bounds, st.booleans())
def test_random_replies_never_raise_nor_overread(chunks: list[bytes], limit: int, close: bool) -> None:
    for matcher in every_matcher(limit):
        check_bounded(matcher, chunks, close)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(structured_replies(), bounds, st.booleans())
def test_protocol_shaped_replies_never_raise_nor_overread(
    chunks: list[bytes], limit: int, close: bool
) -> None:
    for matcher in [PostgresReply(limit), MySQLHandshake(limit), *every_matcher(limit)]:
        check_bounded(matcher, chunks, close)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_escapes_only_raise_value_errors(text: str) -> None:
    with contextlib.suppress(ValueError):
        decode_escapes(text)


HEALTH_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "check": st.sampled_from(["send_expect", "redis", "postgres", "mysql", "smtp", "banner", "tcp"]),
        "send": st.text(max_size=12),
        "expect": st.text(max_size=12),
        "expect_regex": st.one_of(st.text(max_size=8), st.sampled_from(["(", "[a-", "a{99999999999}", "^2"])),
        "expect_bytes": st.one_of(st.integers(-5, 1 << 21), st.text(max_size=3)),
        "user": st.one_of(st.text(max_size=70), st.integers()),
    },
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(HEALTH_KEYS)
def test_any_health_table_is_accepted_with_a_plan_or_rejected_cleanly(health: dict[str, object]) -> None:
    data = {
        "listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
        "pools": {"p": {"servers": ["127.0.0.1:1"], "health": health}},
    }
    try:
        config = parse_config(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: pools.p.health")
        return
    plan_of(config.pools["p"].health)  # whatever check accepts, a probe can be built from


@pytest.mark.slow
def test_anubis_check_rejects_a_bad_regex_with_its_key_path(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    path = tmp_path / "anubis.toml"
    path.write_text('[listeners.l]\nbind = "127.0.0.1:0"\npool = "p"\n[pools.p]\nservers = ["127.0.0.1:1"]\n'
                    '[pools.p.health]\ncheck = "banner"\nexpect_regex = "^220 (unclosed"\n')  # fmt: skip
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{path}: pools.p.health.expect_regex: invalid regular expression: missing )" in result.stderr
    path.write_text(path.read_text().replace("(unclosed", "ready"))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0 and "banner check every 2s" in result.stdout
