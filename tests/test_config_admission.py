"""Config for the PROXY protocol, allow/deny and per-client limits: clear errors; what passes runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import config_for, connect, echo_handler, request, running_balancer, start_backend
from tests.helpers import exchange, run_cli
from trioanubis.config import ConfigError, Rate, parse_config, parse_network, parse_rate
from trioanubis.summary import describe


def listener_error(servers: list[Any] | None = None, **options: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config_for(servers or ["127.0.0.1:9"], listener=options), "test.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"accept_proxy": True},
         'test.toml: listeners.test.proxy_trusted: is required with accept_proxy = true'),
        ({"accept_proxy": True, "proxy_trusted": []}, "listeners.test.proxy_trusted: is required"),
        ({"proxy_trusted": ["10.0.0.0/8"]},
         "listeners.test.proxy_trusted: has no effect without accept_proxy = true"),
        ({"proxy_timeout": "1s"}, "listeners.test.proxy_timeout: has no effect without accept_proxy"),
        ({"accept_proxy": "yes"}, 'listeners.test.accept_proxy: must be true or false, got "yes"'),
        ({"accept_proxy": True, "proxy_trusted": ["10.0.0.0/8"], "proxy_timeout": "0s"},
         'listeners.test.proxy_timeout: must be a duration from 1ms to 24h, got "0s"'),
        ({"allow": ["10.0.0.0/8", "10.0.0.1/8"]},
         'listeners.test.allow[1]: has bits set beyond its prefix length (did you mean "10.0.0.0/8"?), '
         'got "10.0.0.1/8"'),
        ({"deny": ["10.0.0.0/33"]}, 'listeners.test.deny[0]: must be a CIDR like "10.0.0.0/8"'),
        ({"deny": ["localhost"]}, 'listeners.test.deny[0]: must be a CIDR'),
        ({"deny": [7]}, "listeners.test.deny[0]: must be a CIDR string"),
        ({"deny": "10.0.0.0/8"}, 'listeners.test.deny: must be a list of CIDRs'),
        ({"accept_proxy": True, "proxy_trusted": ["::1/129"]},
         "listeners.test.proxy_trusted[0]: must be a CIDR"),
        ({"max_connections_per_client": -1}, "listeners.test.max_connections_per_client: must be an integer"),
        ({"rate_per_client": "20"}, 'listeners.test.rate_per_client: must be a rate like "20/s"'),
        ({"rate_per_client": "0/s"}, "listeners.test.rate_per_client: must be a rate"),
        ({"rate_per_client": "20/0s"},
         "listeners.test.rate_per_client: must be a rate of 1 to 1000000 connections per 1ms to 24h"),
        ({"rate_per_client": "20/fortnight"}, "listeners.test.rate_per_client: must be a duration"),
        ({"rate_per_client": 20}, "listeners.test.rate_per_client: must be a rate"),
        ({"acept_proxy": True}, "listeners.test.acept_proxy: unknown key (did you mean 'accept_proxy'?)"),
    ],
)  # fmt: skip
def test_each_client_option_rule_has_a_clear_error(options: dict[str, Any], expected: str) -> None:
    assert expected in listener_error(**options)


def test_send_proxy_values_and_the_health_option() -> None:
    def pool_error(servers: list[Any], **pool: Any) -> str:
        with pytest.raises(ConfigError) as info:
            parse_config(config_for(servers, **pool), "test.toml")
        return str(info.value)

    plain = ["127.0.0.1:9"]
    assert "pools.test.send_proxy: must be one of 'none', 'v1', 'v2', got \"v3\"" in pool_error(
        plain, send_proxy="v3"
    )
    assert "pools.test.servers[0].send_proxy: must be one of" in pool_error(
        [{"address": "127.0.0.1:9", "send_proxy": "V1"}]
    )
    assert "pools.test.health.send_proxy: has no effect" in pool_error(plain, health={"send_proxy": True})
    config = parse_config(config_for([{"address": "127.0.0.1:9", "send_proxy": "v1"}, "127.0.0.1:10"],
                                     health={"send_proxy": True}), "t")  # fmt: skip
    assert [s.send_proxy for s in config.pools["test"].servers] == ["v1", ""]
    assert config.pools["test"].send_proxy == "none" and config.pools["test"].health.send_proxy


def test_defaults_and_parsed_values() -> None:
    plain = parse_config(config_for(["127.0.0.1:9"]), "t").listeners["test"]
    assert not plain.screens_clients and plain.proxy_timeout == 3.0 and plain.rate_per_client is None
    options = {"accept_proxy": True, "proxy_trusted": ["10.0.0.0/8", "::1"], "allow": ["192.0.2.7"],
               "rate_per_client": "600/m", "max_connections_per_client": 4}  # fmt: skip
    listener = parse_config(config_for(["127.0.0.1:9"], listener=options), "t").listeners["test"]
    assert [str(n) for n in listener.proxy_trusted] == ["10.0.0.0/8", "::1/128"]
    assert [str(n) for n in listener.allow] == ["192.0.2.7/32"]
    assert listener.rate_per_client == Rate(600, 60.0) and listener.rate_per_client.per_second == 10.0
    summary = describe(parse_config(config_for(["127.0.0.1:9"], listener=options), "t"))
    assert "accept_proxy from 10.0.0.0/8, ::1/128 (timeout 3s)" in summary
    assert "allow 192.0.2.7/32" in summary and "per client: 4 connections, 600/60s" in summary


@pytest.mark.parametrize(
    ("text", "rate"),
    [("20/s", Rate(20, 1.0)), ("600/m", Rate(600, 60.0)), ("5/h", Rate(5, 3600.0)),
     ("100/10s", Rate(100, 10.0)), (" 3 / 1m30s ", Rate(3, 90.0))],
)  # fmt: skip
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


def test_networks() -> None:
    assert str(parse_network("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_network("2001:db8::1")) == "2001:db8::1/128"
    with pytest.raises(ValueError, match='did you mean "2001:db8::/32"'):
        parse_network("2001:db8::1/32")


@pytest.mark.slow
def test_anubis_check_rejects_a_bad_cidr_naming_file_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[listeners.web]\nbind = ":8000"\npool = "web"\naccept_proxy = true\n'
                    'proxy_trusted = ["10.0.0.0/8", "300.0.0.0/8"]\n'
                    '[pools.web]\nservers = ["127.0.0.1:9001"]\n')  # fmt: skip
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f'{path}: listeners.web.proxy_trusted[1]: must be a CIDR like "10.0.0.0/8", "2001:db8::/32" or '
        'an address, got "300.0.0.0/8"'
    )
    assert "Traceback" not in result.stderr


cidr_texts = st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "::/0", "0.0.0.0/0", "10.0.0.1/8", "x", "",
                              "::ffff:127.0.0.0/104", "127.0.0.0/33"])  # fmt: skip
option_values = st.fixed_dictionaries(
    {},
    optional={
        "accept_proxy": st.sampled_from([True, False, "true"]),
        "proxy_trusted": st.lists(cidr_texts, max_size=3),
        "proxy_timeout": st.sampled_from(["100ms", "3s", 0, -1, "x"]),
        "allow": st.lists(cidr_texts, max_size=3),
        "deny": st.lists(cidr_texts, max_size=3),
        "max_connections_per_client": st.sampled_from([0, 1, 5, -1, "2"]),
        "rate_per_client": st.sampled_from(["20/s", "1/h", "0/s", "5/0s", "x", 3]),
    },
)

good_cidrs = st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "::/0", "0.0.0.0/0", "127.0.0.0/8",
                                       "::ffff:127.0.0.0/104"]), max_size=3)  # fmt: skip
good_options = st.builds(
    lambda proxy, trusted, allow, deny, most, rate: {
        **({"accept_proxy": True, "proxy_trusted": trusted or ["127.0.0.1"], "proxy_timeout": "1s"}
           if proxy else {}),
        "allow": allow, "deny": deny, "max_connections_per_client": most,
        **({"rate_per_client": rate} if rate else {}),
    },
    st.booleans(), good_cidrs, good_cidrs, good_cidrs, st.integers(0, 3),
    st.sampled_from(["", "20/s", "1/h", "100/10s"]),
)  # fmt: skip


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(good_options, option_values), st.one_of(good_options, option_values))
async def test_every_accepted_client_config_runs_and_reloads(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        try:
            config = parse_config(config_for([backend.address], listener=first), "t")
        except ConfigError as exc:
            assert str(exc).startswith("t: listeners.test.")
            nursery.cancel_scope.cancel()
            return
        async with running_balancer(config_for([backend.address], listener=first)) as (balancer, address):
            describe(config)
            try:
                new = parse_config(config_for([backend.address], listener=second), "t")
            except ConfigError:
                new = config
            await balancer.apply_config(new)
            if not new.listeners["test"].screens_clients:
                assert await request(address) == b"ping"
            else:
                assert await exchange(await connect(address)) in (b"ping", None)  # served, or refused
            assert not balancer.stopped.is_set()
        nursery.cancel_scope.cancel()
