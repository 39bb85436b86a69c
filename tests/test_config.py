"""Config loading: every rule's error names the file, the key path and the value."""

from __future__ import annotations

import contextlib
import math
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import EVENTUALLY, start_backend, wait_until
from trioanubis import config as config_module
from trioanubis.app import Balancer
from trioanubis.config import Address, ConfigError, load_config, parse_address, parse_duration
from trioanubis.config import load as config_load

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[listeners.web]
bind = ":8000"
pool = "web"

[pools.web]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 2, name = "web2" }]
"""


def load_text(tmp_path: Path, text: str) -> config_module.Config:
    path = tmp_path / "anubis.toml"
    path.write_text(text)
    return load_config(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_the_shipped_demo_config_is_valid() -> None:
    config = load_config(ROOT / "anubis.toml")
    assert list(config.listeners) == ["web"]
    assert [s.name for s in config.pools["web"].servers] == ["web1", "web2", "web3"]
    assert config.pools["web"].health.expect_body == "up"


def test_a_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, GOOD)
    pool = config.pools["web"]
    assert config.listeners["web"].bind == Address("", 8000)
    assert [(s.name, s.weight) for s in pool.servers] == [("127.0.0.1:9001", 1), ("web2", 2)]
    assert (pool.strategy, pool.connect_timeout, pool.idle_timeout) == ("round_robin", 3.0, 600.0)
    assert config.settings.drain_timeout == 30.0
    assert config.settings.shutdown_delay == 0.0
    assert pool.health.check == "tcp" and pool.health.rise == 2 and pool.health.fall == 3


def test_shutdown_delay_takes_up_to_ten_minutes(tmp_path: Path) -> None:
    text = GOOD.replace("[pools.web]", '[settings]\nshutdown_delay = "10m"\n[pools.web]', 1)
    assert load_text(tmp_path, text).settings.shutdown_delay == 600.0


def test_bad_weight_names_file_key_and_value(tmp_path: Path) -> None:
    text = GOOD.replace("weight = 2", 'weight = "two"')
    message = error_of(tmp_path, text)
    assert message == (
        f'{tmp_path / "anubis.toml"}: pools.web.servers[1].weight: '
        'must be an integer from 0 to 1000000, got "two"'
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("[pools.web]", "[pools.web]\nconect_timeout = \"2s\""),
         "pools.web.conect_timeout: unknown key (did you mean 'connect_timeout'?)"),
        (('pool = "web"', 'pool = "api"'),
         "listeners.web.pool: names pool 'api', which does not exist (pools: web)"),
        (('bind = ":8000"', 'bind = "localhost"'),
         'listeners.web.bind: must be "host:port" (the port is missing), got "localhost"'),
        (('bind = ":8000"', 'bind = "[::1:8000"'),
         'listeners.web.bind: must be "[ipv6]:port", got "[::1:8000"'),
        (('"127.0.0.1:9001"', '"127.0.0.1:99999"'),
         'pools.web.servers[0].address: the port must be a number from 1 to 65535'),
        (("[pools.web]", "[pools.web]\nidle_timeout = \"10 minutes\""),
         'pools.web.idle_timeout: must be a duration like "250ms", "2s", "1m" or a number of '
         'seconds, got "10 minutes"'),
        (("[pools.web]", "[pools.web]\nstrategy = \"fastest\""),
         'pools.web.strategy: unknown strategy'),
        (("[pools.web]", "[pools.web]\nstrategy = \"no_such_module_x:Thing\""),
         "pools.web.strategy: cannot import module 'no_such_module_x'"),
        (("[pools.web]", "[pools.web]\nstrategy = \"json:NoSuchClass\""),
         "pools.web.strategy: module 'json' has no attribute 'NoSuchClass'"),
        (("[pools.web]", "[pools.web]\nretries = -1"),
         "pools.web.retries: must be an integer from 0 to 100, got -1"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"icmp\" }"),
         "pools.web.health.check: must be one of 'tcp', 'http', 'none', 'send_expect', 'redis', "
         "'postgres', 'mysql', 'smtp', 'banner', got \"icmp\""),
        (("servers = [", "servers = [\":80\", "), "pools.web.servers[0].address: the host is missing"),
        (("name = \"web2\"", "name = \"web2\", backup = true, priority = 2"),
         "pools.web.servers[1]: give either backup = true or priority = N, not both"),
        (("name = \"web2\"", "name = \"web2\", priority = 101"),
         "pools.web.servers[1].priority: must be an integer from 0 to 100, got 101"),
        (("name = \"web2\"", "name = \"web2\", backup = \"yes\""),
         'pools.web.servers[1].backup: must be true or false, got "yes"'),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"send_expect\", send = \"x\", "
                          "expect_regex = \"(\" }"),
         'pools.web.health.expect_regex: invalid regular expression: missing ), unterminated subpattern'),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"redis\", expect = \"+OK\" }"),
         "pools.web.health.expect: replaces the preset's reply, so give send too"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"send_expect\", send = \"PING\" }"),
         "pools.web.health.expect: check = 'send_expect' needs expect or expect_regex"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"banner\" }"),
         "pools.web.health.expect: check = 'banner' needs expect or expect_regex"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"smtp\", send = \"EHLO x\" }"),
         "pools.web.health.send: check = 'smtp' waits for the server to speak first"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"postgres\", expect = \"R\" }"),
         "pools.web.health.expect: check = 'postgres' speaks its protocol itself"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"tcp\", send = \"x\" }"),
         'pools.web.health.send: is only used by the checks send_expect, redis'),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"redis\", user = \"x\" }"),
         'pools.web.health.user: is only used by check = "postgres"'),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"postgres\", user = \"\" }"),
         'pools.web.health.user: must be a PostgreSQL role name'),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"send_expect\", send = \"\\\\q\", "
                          "expect = \"x\" }"),
         "pools.web.health.send: unknown escape '\\\\q'"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"banner\", expect = \"\" }"),
         "pools.web.health.expect: must not be empty"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"banner\", expect = \"abc\", expect_bytes = 2 }"),
         "pools.web.health.expect: is 3 bytes, more than the 2 allowed here"),
        (("[pools.web]", "[pools.web]\nhealth = { check = \"banner\", expect = \"a\", "
                          "expect_regex = \"b\" }"),
         "pools.web.health.expect_regex: give either expect or expect_regex, not both"),
        (("[listeners.web]", "[listener.web]"), "listener: unknown key (did you mean 'listeners'?)"),
    ],
)  # fmt: skip
def test_each_rule_has_a_clear_error(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    message = error_of(tmp_path, GOOD.replace(*change, 1))
    assert message.startswith(f"{tmp_path / 'anubis.toml'}: ")
    assert expected in message


def test_empty_servers_and_missing_listeners(tmp_path: Path) -> None:
    no_servers = GOOD.split("servers = ")[0] + "servers = []\n"
    assert "pools.web.servers: must be a non-empty array of servers, got an array" in error_of(
        tmp_path, no_servers
    )
    no_listeners = "[pools.web]" + GOOD.split("[pools.web]")[1]
    assert "(top level): at least one [listeners.NAME] table is required" in error_of(
        tmp_path, no_listeners
    )


def test_duplicate_binds_are_rejected(tmp_path: Path) -> None:
    text = GOOD + '\n[listeners.other]\nbind = ":8000"\npool = "web"\n'
    assert ('listeners.other.bind: overlaps listeners.web.bind = ":8000" on port 8000: the same address'
            in error_of(tmp_path, text))  # fmt: skip


def test_toml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace('pool = "web"', "pool = "))
    assert "invalid TOML" in message
    assert "line 4" in message and "column" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0), (5, 5.0), (0.5, 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "2 s", "s", "-1s", "1d", True, -3])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:80", Address("127.0.0.1", 80)), ("[::1]:8000", Address("::1", 8000)),
     ("example.com:443", Address("example.com", 443))],
)  # fmt: skip
def test_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


def test_listen_anywhere_only_for_listeners() -> None:
    assert parse_address(":8000", allow_any_host=True) == Address("", 8000)
    with pytest.raises(ValueError, match="host is missing"):
        parse_address(":8000")


def test_tomli_code_path_parses_the_same(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Python < 3.11 parses with tomli: run the loader with it and compare the results."""
    tomli = pytest.importorskip("tomli", reason="tomli is in the test extra")
    with_stdlib = load_config(ROOT / "anubis.toml")
    monkeypatch.setattr(config_load, "tomllib", tomli)
    assert repr(load_config(ROOT / "anubis.toml")) == repr(with_stdlib)
    assert "invalid TOML" in error_of(tmp_path, "[listeners.web\n")


# ------------------------------------------- what `run` or a reload would fail on


HOSTILE = [
    ("[pools.web]", '[pools.web.health]\ncheck = "http"\npath = "/health x"\n[pools.web]',
     'pools.web.health.path: must be visible ASCII without spaces'),
    ("[pools.web]", '[pools.web.health]\npath = "/héalth"\n[pools.web]',
     'pools.web.health.path: must be visible ASCII'),
    ("[pools.web]", '[pools.web.health]\npath = "/h\\r\\nX-Evil: 1"\n[pools.web]',
     'pools.web.health.path: must be visible ASCII'),
    ("[pools.web]", '[pools.web.health]\npath = ""\n[pools.web]',
     'pools.web.health.path: must start with "/"'),
    ("[pools.web]", '[pools.web.health]\nhost = "a b"\n[pools.web]',
     'pools.web.health.host: \'a b\' is not a valid host name'),
    ("[pools.web]", '[pools.web.health]\nhost = "exämple.com"\n[pools.web]',
     'pools.web.health.host: must be ASCII'),
    ("[pools.web]", '[pools.web.health]\nhost = "h\\r\\nX: y"\n[pools.web]',
     'pools.web.health.host: '),
    ("[pools.web]", '[pools.web.health]\nhost = "example.com:99999"\n[pools.web]',
     'pools.web.health.host: the port must be a number from 1 to 65535'),
    ("[pools.web]", '[pools.web.health]\nhost = "[::1"\n[pools.web]',
     'pools.web.health.host: an IPv6 host is written'),
    ('"127.0.0.1:9001"', '"a..b:80"', "pools.web.servers[0].address: 'a..b' is not a valid host name"),
    ('"127.0.0.1:9001"', f'"{"a" * 64}.example:80"',
     "pools.web.servers[0].address: " + repr("a" * 64 + ".example")),
    ('"127.0.0.1:9001"', '"ä..b:80"', "pools.web.servers[0].address: 'ä..b' is not a valid international"),
    ('"127.0.0.1:9001"', '"x\\u0000y:80"', "pools.web.servers[0].address: "),
    ('"127.0.0.1:9001"', '{ dns = "a..b:80" }', "pools.web.servers[0].dns: 'a..b' is not a valid host name"),
    ('"127.0.0.1:9001"', '{ srv = "_http._tcp.a..b" }',
     "pools.web.servers[0].srv: '_http._tcp.a..b' is not a valid host name"),
    ('bind = ":8000"', 'bind = "a..b:80"', "listeners.web.bind: 'a..b' is not a valid host name"),
    ("[listeners.web]", '[admin]\nbind = "a..b:80"\n[listeners.web]', "admin.bind: 'a..b' is not a valid"),
    ("[pools.web]", '[pools.web.health]\ninterval = nan\n[pools.web]',
     "pools.web.health.interval: must be a finite duration from 1ms to 24h, got nan"),
    ("[pools.web]", '[pools.web.health]\ntimeout = inf\n[pools.web]',
     "pools.web.health.timeout: must be a finite duration from 1ms to 24h, got inf"),
    ("[pools.web]", "[settings]\ndrain_timeout = nan\n[pools.web]",
     "settings.drain_timeout: must be a finite duration from 0 to 24h, got nan"),
    ("[pools.web]", '[settings]\nshutdown_delay = "10m1s"\n[pools.web]',
     'settings.shutdown_delay: must be a duration from 0 to 600s, got "10m1s"'),
    ("[pools.web]", "[settings]\nshutdown_delay = -1\n[pools.web]",
     "settings.shutdown_delay: must be a duration from 0 to 600s, got -1"),
    ("[pools.web]", "[pools.web]\nconnect_timeout = nan", "pools.web.connect_timeout: must be a finite"),
    ("[pools.web]", "[pools.web]\nidle_timeout = -inf", "pools.web.idle_timeout: must be a finite"),
    ("[pools.web]", f'[pools.web]\nfailover_timeout = "{"9" * 400}s"',
     f'pools.web.failover_timeout: must be a duration from 0 to 24h, got "{"9" * 48}...{"9" * 12}s"'),
    ("[pools.web]", '[pools.web]\nstrategy = "trioanubis.strategies.base:Strategy"',
     "pools.web.strategy: trioanubis.strategies.base:Strategy is a typing.Protocol"),
    ("[pools.web]", '[pools.web]\nstrategy = "fractions:Fraction"',
     "pools.web.strategy: fractions:Fraction is not a class with a pick"),
    ("[pools.web]", '[pools.web]\nstrategy = "tests.test_config:NeedsArguments"',
     "pools.web.strategy: tests.test_config:NeedsArguments() cannot be instantiated"),
    ("[pools.web]", '[settings]\nresolver = "localhost"\n[pools.web]',
     "settings.resolver: must be an IP address with an optional \":port\" (default 53)"),
    ("[pools.web]", '[settings]\nresolver = "dns.example:53"\n[pools.web]',
     "settings.resolver: must be an IP address"),
    ("[pools.web]", '[pools.web]\nresolver = "10.0.0.1:99999"',
     "pools.web.resolver: the port must be a number"),
]  # fmt: skip


class NeedsArguments:
    def __init__(self, servers: list[str]) -> None:
        self.servers = servers

    def pick(self, servers: object, client_key: bytes, usable: object) -> None:
        return None


@pytest.mark.slow
@pytest.mark.parametrize(("anchor", "replacement", "expected"), HOSTILE)
def test_values_run_would_fail_on_are_rejected(
    tmp_path: Path, anchor: str, replacement: str, expected: str
) -> None:
    message = error_of(tmp_path, GOOD.replace(anchor, replacement, 1))
    assert message.startswith(f"{tmp_path / 'anubis.toml'}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("health.path", "/health?probe=1&x=%20"), ("health.host", "example.com"),
     ("health.host", "example.com:8080"), ("health.host", "[::1]:80"), ("health.host", "10.0.0.1"),
     ("address", "bücher.example:80"), ("address", "my_service:80"), ("address", "host.example.:80")],
)  # fmt: skip
def test_unusual_but_valid_values_are_accepted(key: str, value: str) -> None:
    pool: dict[str, object] = {"servers": ["127.0.0.1:9001"]}
    if key == "address":
        pool["servers"] = [value]
    else:
        pool["health"] = {key.split(".")[1]: value}
    config = config_module.parse_config({"listeners": {"w": {"bind": ":1", "pool": "p"}},
                                         "pools": {"p": pool}})  # fmt: skip
    assert config.pools["p"].servers or config.pools["p"].discovery


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1", "127.0.0.1:53"), ("127.0.0.1:5353", "127.0.0.1:5353"), ("::1", "[::1]:53"),
     ("[::1]", "[::1]:53"), ("[::1]:5353", "[::1]:5353")],
)  # fmt: skip
def test_a_resolver_port_defaults_to_53(tmp_path: Path, text: str, expected: str) -> None:
    config = load_text(tmp_path, f'[settings]\nresolver = "{text}"\n{GOOD}'
                       .replace("[pools.web]", f'[pools.web]\nresolver = "{text}"'))  # fmt: skip
    assert config.settings.resolver == expected
    assert config.pools["web"].resolver == expected


# Two binds that cannot both listen, and the key path the error names.
V4_ANY = '0.0.0.0 (or ":port") is every IPv4 address'
V6_ANY = "[::] is every address, IPv4 and IPv6 (dual-stack)"
# Where a bind to "localhost" listens here: what getaddrinfo gives first, as the bind asks.
_LOCAL = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
LOCALHOST_IP = f"[{_LOCAL}]" if ":" in _LOCAL else _LOCAL
OVERLAPS = [
    (":31840", "0.0.0.0:31840", "the same address"),
    ("0.0.0.0:31840", "127.0.0.1:31840", V4_ANY),
    ("127.0.0.1:31840", ":31840", V4_ANY),
    ("[::]:31840", "10.1.2.3:31840", V6_ANY),
    ("[::]:31840", "[::1]:31840", V6_ANY),
    ("[::]:31840", ":31840", V6_ANY),
    ("[::ffff:127.0.0.1]:31840", "127.0.0.1:31840", "the same address"),
    ("localhost:31840", "LOCALHOST:31840", "the same address"),
    ("localhost:31840", f"{LOCALHOST_IP}:31840", "the same address"),
    ("localhost:31840", ":31840", V4_ANY),
]


@pytest.mark.parametrize(("first", "second", "why"), OVERLAPS)
def test_overlapping_binds_are_rejected_naming_both(
    tmp_path: Path, first: str, second: str, why: str
) -> None:
    text = GOOD.replace('":8000"', f'"{first}"') + f'\n[listeners.other]\nbind = "{second}"\npool = "web"\n'
    message = error_of(tmp_path, text)
    expected = f'listeners.other.bind: overlaps listeners.web.bind = "{first}" on port 31840: {why}'
    assert expected in message
    assert message.endswith(f'got "{second}"')


def test_the_admin_bind_counts_as_a_listener(tmp_path: Path) -> None:
    text = f'[admin]\nbind = "127.0.0.1:8000"\n{GOOD}'
    message = error_of(tmp_path, text)
    assert f'admin.bind: overlaps listeners.web.bind = ":8000" on port 8000: {V4_ANY}' in message


@pytest.mark.parametrize(
    ("first", "second"),
    [("127.0.0.1:31840", "127.0.0.2:31840"), ("[::1]:31840", "0.0.0.0:31840"),
     ("127.0.0.1:0", "127.0.0.1:0"), (":31840", ":31841"), ("a.example:31840", "b.example:31840")],
)  # fmt: skip
def test_binds_that_do_not_overlap_are_accepted(tmp_path: Path, first: str, second: str) -> None:
    text = GOOD.replace('":8000"', f'"{first}"') + f'\n[listeners.other]\nbind = "{second}"\npool = "web"\n'
    assert len(load_text(tmp_path, text).listeners) == 2


# ------------------------------------------------------------ reading the file


def test_deeply_nested_toml_is_a_clean_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    # Our words when the parser runs out of recursion; a parser with a depth limit of its own
    # may say it in its words instead.
    assert message.startswith(f"{tmp_path / 'anubis.toml'}: invalid TOML: ") and "\n" not in message


def test_a_file_over_one_mebibyte_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD + "#" * (1 << 20) + "\n")
    assert message.endswith("cannot read the config file: larger than 1024 KiB")


@pytest.mark.parametrize("path", ["/dev/null"])  # /dev/zero: in a subprocess (test_cli), memory-capped
def test_a_device_is_refused(path: str) -> None:
    if not Path(path).exists():
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(ConfigError, match=f"^{path}: cannot read the config file: not a regular file$"):
        load_config(path)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path)


def test_a_strategy_beside_the_config_leaves_sys_path_as_it_was(tmp_path: Path) -> None:
    import sys

    (tmp_path / "beside_strategy_x.py").write_text(
        "class Pick:\n    def pick(self, servers, client_key, usable):\n        return None\n"
    )
    before = list(sys.path)
    text = GOOD.replace("[pools.web]", '[pools.web]\nstrategy = "beside_strategy_x:Pick"')
    try:
        assert load_text(tmp_path, text).pools["web"].strategy == "beside_strategy_x:Pick"
        assert sys.path == before
    finally:
        sys.modules.pop("beside_strategy_x", None)


# ------------------------- property: whatever check accepts, run and reload apply

BACKEND = "BACKEND"  # replaced by the live backend's address once it listens


def mix(valid: list[Any], hostile: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid (often unusual) value, one time in sixteen a hostile one.

    Hostile values are rarer than valid ones so that a fair share of the
    generated configs passes validation and runs; a config with several
    hostile keys is rejected by the first, and tests nothing after it.
    """
    return st.sampled_from(range(16)).flatmap(lambda n: st.sampled_from(hostile if n == 15 else valid))


DURATIONS = mix(["250ms", "2s", "1m30s", 0, 0.5, 3, "1h", 1e300, "99999999999h"],
                [math.nan, math.inf, -math.inf, -1, "9" * 400 + "s", "", "2 s", True])
POSITIVE_INTS = [0, 1, 5, 2**62]
HOSTS = mix(["127.0.0.1:1", "localhost:1", "[::1]:1", "[::ffff:127.0.0.1]:1", "my_host.invalid.:1"],
            ["a..b:80", "x" * 64 + ":80", "ä..b:80", "x\x00y:80", ":80", "127.0.0.1:0", "127.0.0.1:99999", 7])
BINDS = mix(["127.0.0.1:0", "localhost:0"], ["a..b:0", "x" * 64 + ":0", "127.0.0.1:99999", "", "x\ny:0"])


def _maybe(draw: st.DrawFn, table: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> None:
    if draw(st.booleans()):
        table[key] = draw(values)


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A config mixing valid and hostile values for every key (the servers include BACKEND)."""
    health: dict[str, Any] = {"check": draw(mix(["http", "tcp", "none"], ["icmp"]))}
    _maybe(draw, health, "path", mix(["/health", "/ok?a=1&b=%20", "/~x/(y)"],
                                     ["/health x", "/héalth", "/h\r\nX: 1", "", "health", "/\x7f"]))
    _maybe(draw, health, "host", mix(["", "example.com", "[::1]:80", "10.0.0.1:8080", "a_b.example."],
                                     ["a b", "h\r\nx", "exämple.com", "x:0", "[::1", "a..b"]))
    _maybe(draw, health, "expect_status", mix([200, 100, 599], [99, 600, "200"]))
    _maybe(draw, health, "expect_body", mix(["", "up", "ü\x00\r\n"], [7]))
    for key in ("interval", "timeout", "slow_start"):
        _maybe(draw, health, key, DURATIONS)
    for key in ("rise", "fall"):
        _maybe(draw, health, key, mix([1, 2, 1000], [0, -1, 10**9]))
    servers = [BACKEND, *draw(st.lists(st.one_of(HOSTS, st.fixed_dictionaries(
        {"address": HOSTS}, optional={"weight": mix([0, 1, 5, 10**6], [-1, 10**7]),
                                      "max_connections": mix(POSITIVE_INTS, [-1])})),
        max_size=3, unique_by=lambda s: str(s["address"] if isinstance(s, dict) else s)))]  # fmt: skip
    pool: dict[str, Any] = {"servers": servers, "health": health}
    _maybe(draw, pool, "strategy", mix(
        ["round_robin", "least_connections", "least_time", "random", "power_of_two", "source_hash",
         "trioanubis.strategies.round_robin:RoundRobin"],
        ["trioanubis.strategies.base:Strategy", "fractions:Fraction", "json:loads", "nope",
         "tests.test_config:NeedsArguments", "no_such_module_x:X"]))  # fmt: skip
    for key in ("connect_timeout", "idle_timeout", "half_close_timeout", "failover_timeout", "eject_for"):
        _maybe(draw, pool, key, DURATIONS)
    for key in ("retries", "eject_after"):
        _maybe(draw, pool, key, mix([0, 2, 100], [-1, 101, "2"]))
    _maybe(draw, pool, "least_time", mix(["first_byte", "connect"], ["x"]))
    _maybe(draw, pool, "resolver", mix(["", "127.0.0.1", "[::1]:5353"], ["localhost", "a..b", "1.2.3.4:0"]))
    settings_: dict[str, Any] = {}
    _maybe(draw, settings_, "drain_timeout", DURATIONS)
    # (short ones: the run below stops within its deadline, and the delay comes before the drain)
    _maybe(draw, settings_, "shutdown_delay", mix(["0s", "50ms", 0, 0.1], ["10m1s", -1, math.nan, "x"]))
    _maybe(draw, settings_, "log_format", mix(["text", "json"], ["xml"]))
    _maybe(draw, settings_, "access_log", mix([True, False], ["yes"]))
    _maybe(draw, settings_, "max_connections", mix(POSITIVE_INTS, [-1]))
    _maybe(draw, settings_, "resolver", mix(["127.0.0.1", "::1"], ["127.0.0.1:99999", "dns.example"]))
    listener: dict[str, Any] = {"bind": draw(BINDS), "pool": "p"}
    _maybe(draw, listener, "max_connections", mix(POSITIVE_INTS, [-1]))
    _maybe(draw, listener, "backlog", mix([0, 1, 65535], [65536, -1]))
    data: dict[str, Any] = {"settings": settings_, "listeners": {"l": listener}, "pools": {"p": pool}}
    if draw(st.booleans()):
        data["admin"] = {"bind": draw(BINDS), "token": draw(mix(["", "t", "\r\n"], [7]))}
    return data


def _with_backend(data: Any, address: str) -> Any:
    if isinstance(data, dict):
        return {key: _with_backend(value, address) for key, value in data.items()}
    if isinstance(data, list):
        return [_with_backend(value, address) for value in data]
    return address if data == BACKEND else data


async def _http_backend(stream: trio.SocketStream) -> None:
    """Answer one request with "up"; a client that sends nothing keeps the connection open."""
    head = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while b"\r\n\r\n" not in head and (data := await stream.receive_some(4096)):
            head += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nup")
    await stream.aclose()


async def _run_then_reload(data: dict[str, Any], reload_data: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, _http_backend)
        try:
            config = config_module.parse_config(_with_backend(data, backend.address), "fuzz.toml")
        except ConfigError:
            nursery.cancel_scope.cancel()
            return
        try:
            new = config_module.parse_config(_with_backend(reload_data, backend.address), "fuzz.toml")
        except ConfigError:
            new = config
        balancer = Balancer(config)
        with trio.fail_after(EVENTUALLY):
            bound = await nursery.start(balancer.run)
        address, listener = next(iter(bound.values())), balancer.listeners["l"]
        client = await trio.open_tcp_stream(address.host, address.port)
        async with client:
            with trio.fail_after(EVENTUALLY):  # the connection is handled (proxied or refused)
                await wait_until(lambda: listener.accepted + listener.rejected > 0)
                await balancer.apply_config(new)
            balancer.shutdown()  # drains: drain_timeout is used here if the client is still connected
            await trio.sleep(0)
        with trio.fail_after(EVENTUALLY):
            await balancer.stopped.wait()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
@example(data={"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
               "pools": {"p": {"servers": [BACKEND], "health": {"check": "http", "path": "/health x"}}}},
         reload_data={})
@example(data={"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
               "settings": {"drain_timeout": math.nan},
               "pools": {"p": {"servers": [BACKEND], "health": {"check": "none"}}}},
         reload_data={})
@example(data={"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
               "pools": {"p": {"servers": [BACKEND, "a..b:80"], "health": {"check": "tcp"}}}},
         reload_data={})
@example(data={"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}},
               "pools": {"p": {"servers": [BACKEND], "strategy": "trioanubis.strategies.base:Strategy"}}},
         reload_data={})
@given(data=config_dicts(), reload_data=config_dicts())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_config_check_accepts_runs_reloads_and_drains(
    data: dict[str, Any], reload_data: dict[str, Any]
) -> None:
    """No value `check` lets through may raise later: start, first health round, reload, drain."""
    trio.run(_run_then_reload, data, reload_data)


# ------------------------------------------- anubis.toml is the reference for every key

# A config that visits every kind of table config.py validates, so that each
# table's `check_keys` call reports the keys it accepts. A new key in an
# existing table needs nothing here; a new kind of table needs an entry.
EVERY_TABLE: dict[str, Any] = {
    "settings": {},
    "admin": {},
    "listeners": {"web": {"bind": ":1", "pool": "web"}},
    "pools": {"web": {
        "health": {},
        "servers": ["127.0.0.1:1", {"address": "127.0.0.1:2"}, {"dns": "web.example:80"},
                    {"srv": "_http._tcp.web.example"}],
    }},
}  # fmt: skip


def accepted_keys() -> dict[str, set[str]]:
    """{"pools.*.health": {"check", "path", …}, …}: what each table's validation accepts."""
    tables: dict[str, set[str]] = {}
    original = config_module.Node.check_keys

    def recording(node: config_module.Node, known: tuple[str, ...]) -> None:
        path = re.sub(r"^(listeners|pools)\.[^.\[]+", r"\1.*", node.path)
        tables.setdefault(re.sub(r"\[\d+\]", "[]", path), set()).update(known)
        original(node, known)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_module.Node, "check_keys", recording)
        config_module.parse_config(EVERY_TABLE)
    return tables


def reference_sections(text: str) -> dict[str, str]:
    """The text under each table header of anubis.toml, headers commented out or not."""
    sections: dict[str, str] = {"": ""}
    current = ""
    for line in text.splitlines():
        header = re.match(r"\s*(?:#\s*)?\[([\w.-]+)\](?:\s*#.*)?$", line)
        if header:
            current = re.sub(r"^(listeners|pools)\.[^.]+", r"\1.*", header.group(1))
            sections.setdefault(current, "")
            continue
        sections[current] += line + "\n"
    return sections


def test_every_key_config_py_accepts_is_in_the_reference_anubis_toml() -> None:
    sections = reference_sections((ROOT / "anubis.toml").read_text())
    missing = []
    for table, keys in sorted(accepted_keys().items()):
        if not table:  # top level: each key is a table of its own
            missing += [f"[{key}]" for key in sorted(keys)
                        if not any(s.split(".")[0] == key for s in sections)]  # fmt: skip
            continue
        section = re.sub(r"\.\w+\[\]$", "", table)  # servers[] entries live in their pool's table
        body = sections.get(section, "")
        missing += [f"{table}.{key}" for key in sorted(keys)
                    if f"{section}.{key}" not in sections  # a sub-table, like [pools.web.health]
                    and not re.search(rf"(?:^|[\s{{,#]){key}\s*=", body, re.MULTILINE)]  # fmt: skip
    assert not missing, (
        "anubis.toml is the reference for every key config.py accepts, but lacks: "
        + ", ".join(missing)
        + ". Add each under its table with its default and a comment (commented out, "
        "\"# key = default\", when it should not be active in the demo)."
    )


def test_the_key_walk_sees_every_table_kind() -> None:
    tables = accepted_keys()
    assert {"", "settings", "admin", "listeners.*", "pools.*", "pools.*.health",
            "pools.*.servers[]"} <= set(tables)  # fmt: skip
    assert {"address", "dns", "srv", "refresh", "weight"} <= tables["pools.*.servers[]"]


@pytest.mark.parametrize("source", ["x" * 5000, "a\0b", "{'not': 'a path'}", ""])
def test_a_source_that_is_no_path_parses_with_the_cwd_as_base(source: str) -> None:
    """Workers parse a config sent with its source name; a name that is no path must not raise."""
    data = {"listeners": {"web": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:1"]}}}  # fmt: skip
    assert config_module.parse_config(data, source).listeners["web"].pool == "p"
