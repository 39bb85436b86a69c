"""Config loading: every rule's error names the file, the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioanubis import config as config_module
from trioanubis.config import Address, ConfigError, load_config, parse_address, parse_duration

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
    assert pool.health.check == "tcp" and pool.health.rise == 2 and pool.health.fall == 3


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
    assert "listeners.other.bind: binds :8000, which listener 'web' binds already" in error_of(
        tmp_path, text
    )


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
    monkeypatch.setattr(config_module, "tomllib", tomli)
    assert repr(load_config(ROOT / "anubis.toml")) == repr(with_stdlib)
    assert "invalid TOML" in error_of(tmp_path, "[listeners.web\n")
