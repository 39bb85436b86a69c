"""Every number in a config has a range (issue 28): an extreme is refused on one line, or it runs.

`trioanubis/config/ranges.py` is the table; these tests hold it to the reference anubis.toml
(every numeric key there has a range, and its comment says which), feed every key its extremes
(refused with one line naming the key path, or accepted within its range and then run, reloaded
to and back without an exception, the balancer still echoing byte for byte), and replay what an
attacker found on main: `anubis check`, a SIGHUP reload with workers, and the admin's bodies.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    connect_when_listening,
    echo_handler,
    free_port,
    request,
    running_balancer,
    start_backend,
)
from tests.helpers import ANUBIS, anubis, run_cli
from trioanubis.app import Balancer
from trioanubis.config import (
    RANGES,
    Address,
    Config,
    ConfigError,
    Range,
    parse_bandwidth,
    parse_config,
    parse_config_text,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
KEYS = [(table, key) for table, keys in RANGES.items() for key in keys]
SOURCE = "extreme.toml"
HUGE = "1" + "0" * 309  # 310 digits: what the attacker used

# ------------------------------------------------------- the reference names every range


def table_kind(header: str) -> str:
    """A table header of anubis.toml as the kind ranges.py files it under."""
    kind = re.sub(r"^(listeners|pools)\.[^.]+", r"\1.*", header)
    return "faults" if kind.endswith(".faults") else kind


def reference_lines() -> Iterator[tuple[str, str]]:
    """(table kind, line) for each line of anubis.toml, headers commented out or not."""
    kind, in_servers = "", False
    for line in (ROOT / "anubis.toml").read_text().splitlines():
        header = re.match(r"\s*(?:#\s*)?\[([\w.-]+)\](?:\s*#.*)?$", line)
        if header:
            kind, in_servers = table_kind(header.group(1)), False
            continue
        if kind == "pools.*" and line.startswith("servers = ["):
            in_servers = True
        elif in_servers and line.startswith("]"):
            in_servers = False
        yield ("pools.*.servers[]" if in_servers else kind), line


# A number as the reference writes one: 30, 1.0, "30s", "64KB", "1MB/s", "20/s".
_NUMBER = r'-?\d[\d_]*(?:\.\d+)?|"\d+(?:\.\d+)?(?:ms|s|m|h|B|KB|MB|GB|KiB|MiB|GiB)?(?:/\d*[a-z]+)?"'
_ASSIGNMENT = re.compile(rf"(?:^|[\s{{,#])(\w+)\s*=\s*(?:{_NUMBER})\s*(?:[,}}#]|$)")


def reference_numbers() -> set[tuple[str, str]]:
    return {(kind, m.group(1)) for kind, line in reference_lines() for m in _ASSIGNMENT.finditer(line)}


def test_the_reference_numbers_are_found() -> None:
    found = reference_numbers()
    assert {("settings", "drain_timeout"), ("listeners.*", "rate_per_client"), ("faults", "bandwidth"),
            ("pools.*.servers[]", "refresh"), ("pools.*.servers[]", "weight"),
            ("pools.*.health", "expect_bytes"), ("faults", "probability")} <= found  # fmt: skip
    assert ("pools.*.servers[]", "address") not in found and ("listeners.*", "bind") not in found


def test_every_numeric_key_of_the_reference_has_a_range() -> None:
    found = reference_numbers()
    missing = sorted(f"{table}.{key}" for table, key in found if key not in RANGES.get(table, {}))
    assert not missing, f"numbers in anubis.toml without a range in config/ranges.py: {', '.join(missing)}"


def test_every_range_is_written_in_the_reference_next_to_its_key() -> None:
    """The line naming a key says its range in parentheses: `drain_timeout = "30s"  # (0 to 24h) ...`."""
    lines = list(reference_lines())
    undocumented = []
    for table, key in KEYS:
        pattern = re.compile(rf"(?<![\w.]){key}\b.*\({re.escape(RANGES[table][key].bounds())}\)")
        if not any(kind == table and pattern.search(line) for kind, line in lines):
            undocumented.append(f"{table}.{key} ({RANGES[table][key].bounds()})")
    assert not undocumented, f"anubis.toml does not give these ranges: {', '.join(undocumented)}"


# ------------------------------------------------------- where a key goes in a minimal config


def minimal(server: str = "127.0.0.1:9") -> dict[str, Any]:
    pool = {"servers": [{"address": server, "name": "echo"}], "health": {"check": "none"}}
    return {"listeners": {"l": {"bind": "127.0.0.1:0", "pool": "p"}}, "pools": {"p": pool}}


# What some keys need beside them to mean anything (and to pass the checks across keys).
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("listeners.*", "proxy_timeout"): {"accept_proxy": True, "proxy_trusted": ["127.0.0.1/32"]},
    ("listeners.*", "peek_timeout"): {"routes": [{"sni": "a.example", "pool": "p"}]},
    ("pools.*.health", "expect_bytes"): {"check": "send_expect", "send": "p", "expect": "p"},
    ("faults", "jitter"): {"latency": "60s"},
    ("faults", "slice_delay"): {"slice": 1},
    ("pools.*", "balance_factor"): {"strategy": "source_hash"},
    ("pools.*.health.agent", "timeout"): {"interval": "1h"},
    ("pools.*", "mirror_percent"): {"mirror": "127.0.0.1:9"},
}
# A replica that listens on its port until it is stopped, in a few MB: the spawn keys run for real.
REPLICA = [sys.executable, "-S", "-c",
           "import socket,sys,time;s=socket.socket();s.bind(('127.0.0.1',int(sys.argv[1])));s.listen();"
           "time.sleep(3600)", "{port}"]  # fmt: skip


def place(table: str, key: str, value: object, server: str = "127.0.0.1:9") -> tuple[dict[str, Any], str]:
    """A minimal config with `key` set to `value`, and the key path an error must name."""
    data = minimal(server)
    pool, extra = data["pools"]["p"], COMPANIONS.get((table, key), {})
    where: dict[str, Any]
    if table == "settings":
        where, path = data.setdefault("settings", {}), "settings"
    elif table == "listeners.*":
        where, path = data["listeners"]["l"], "listeners.l"
    elif table == "pools.*":
        where, path = pool, "pools.p"
    elif table == "pools.*.servers[]" and key == "refresh":
        where, path = {"dns": f"localhost:{server.rpartition(':')[2]}"}, "pools.p.servers[1]"
        pool["servers"].append(where)
    elif table == "pools.*.servers[]":
        where, path = pool["servers"][0], "pools.p.servers[0]"
    elif table == "pools.*.health":
        where, path = pool["health"] | {"check": "tcp"}, "pools.p.health"
        pool["health"] = where
    elif table == "pools.*.spawn":
        where, path = {"command": REPLICA}, "pools.p.spawn"
        pool["spawn"] = where
    elif table == "pools.*.health.agent":
        where, path = {"port": 9}, "pools.p.health.agent"
        pool["health"]["agent"] = where
    elif table == "cluster":  # an etcd nobody answers on: the balancer serves all the same
        where, path = {"etcd": ["http://127.0.0.1:9"]}, "cluster"
        data["cluster"] = where
    else:
        assert table == "faults", table
        where, path = pool.setdefault("faults", {}), "pools.p.faults"
    where.update(extra)
    where[key] = value
    return data, f"{path}.{key}"


def parsed(config: Config, table: str, key: str) -> Any:
    """What the config holds for the key `place` set."""
    pool = config.pools["p"]
    record: Any = {
        "settings": config.settings, "listeners.*": config.listeners["l"], "pools.*": pool,
        "pools.*.health": pool.health, "pools.*.spawn": pool.spawn, "faults": pool.faults,
        "pools.*.health.agent": pool.health.agent, "cluster": config.cluster,
        "pools.*.servers[]": pool.discovery[0] if key == "refresh" else pool.servers[0],
    }[table]  # fmt: skip
    value = getattr(record, key)
    return value.count if table == "listeners.*" and key == "rate_per_client" else value


def check_outcome(table: str, key: str, value: object) -> Config | None:
    """Parse `value` for `key`: a refusal must be one line naming the key path; an acceptance
    must be within the key's range. The config when accepted."""
    data, path = place(table, key, value)
    try:
        config = parse_config(data, SOURCE)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 400, message
        assert message.startswith(f"{SOURCE}: {path}: "), message
        return None
    limit = RANGES[table][key]
    assert limit.low <= parsed(config, table, key) <= limit.high, (value, parsed(config, table, key))
    return config


# ------------------------------------------------------- the attacker's findings (each failed on main)


def test_a_rate_with_a_310_digit_count_is_refused() -> None:
    """Main accepted it; a reload then died on `count / period` (OverflowError) in proxy/clients.py."""
    data, path = place("listeners.*", "rate_per_client", f"{HUGE}/s")
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    assert str(info.value) == (f'{SOURCE}: {path}: must be a rate of 1 to 1000000 connections per 1ms to '
                               f'24h, like "20/s", got "{HUGE[:48]}...{HUGE[-11:]}/s"')  # fmt: skip


@pytest.mark.parametrize(("table", "key"), [("settings", "drain_timeout"), ("pools.*", "idle_timeout"),
                                            ("pools.*", "queue_timeout")])  # fmt: skip
@pytest.mark.parametrize("written", [int(HUGE), f"{HUGE}s", -int(HUGE)], ids=["int", "string", "negative"])
def test_a_310_digit_timeout_is_refused_on_one_line(table: str, key: str, written: object) -> None:
    """Main raised OverflowError (a traceback from `anubis check`) converting the int to a float."""
    data, path = place(table, key, written)
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    low = "1ms" if key == "idle_timeout" else "0"
    assert str(info.value).startswith(f"{SOURCE}: {path}: must be a duration from {low} to 24h, got ")
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("key", "written"), [("bandwidth", f"{HUGE}MB/s"), ("reset_after", f"{HUGE}KB"),
                                              ("slice", f"{HUGE}.5B"), ("latency", 10**3000)],
                         ids=["bandwidth", "reset_after", "slice", "latency"])  # fmt: skip
def test_huge_sizes_and_delays_in_faults_are_refused(key: str, written: object) -> None:
    """Main raised OverflowError for these (round(inf) for a size, float(int) for a delay)."""
    data, path = place("faults", key, written)
    with pytest.raises(ConfigError, match=re.escape(f"{SOURCE}: {path}: must be a ")):
        parse_config(data, SOURCE)


# Python's limit on the digits int() reads (3.11, and 3.10 from 3.10.7 on).
DIGIT_LIMIT = pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit")


@DIGIT_LIMIT
def test_a_toml_integer_beyond_python_s_digit_limit_is_invalid_toml() -> None:
    """tomllib raises a plain ValueError for it (4300 digits, sys.get_int_max_str_digits): main let it out."""
    text = f'[settings]\ndrain_timeout = {"9" * 5000}\n[listeners.l]\nbind = ":1"\npool = "p"\n'
    with pytest.raises(ConfigError, match=r"^x.toml: invalid TOML: a number too long to read"):
        parse_config_text(text, "x.toml")


async def admin_exchange(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.0 request to the admin: (status, body)."""
    stream = await connect_when_listening(port)
    async with stream:
        head = f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body)
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_3000_digit_latency_through_the_admin_is_a_400(nursery: trio.Nursery) -> None:
    """Main answered 500 and logged a traceback (parse_faults converted the int to a float)."""
    backend = await start_backend(nursery, echo_handler)
    data = minimal(backend.address) | {"admin": {"bind": "127.0.0.1:0"}}
    async with running_balancer(data) as (balancer, address):
        assert balancer.admin_address is not None
        port = balancer.admin_address.port
        body = b'{"latency": 1' + b"0" * 3000 + b"}"
        status, answer = await admin_exchange(port, "PUT", "/pools/p/servers/echo/faults", body)
        assert status == 400, answer
        message = json.loads(answer)["error"]
        assert message.startswith("admin request: faults.latency: must be a duration from 0 to 60s, got ")
        assert "\n" not in message and len(message) < 200
        assert (await admin_exchange(port, "GET", "/healthz"))[0] == 200
        assert await request(address, b"still") == b"still"


# ------------------------------------------------------- every key, every extreme

EXTREMES: list[object] = [
    0, -1, 1, 2, 10**300, -(10**300), 2**63, 2**63 - 1, -(2**63), 2**31, 2**32 + 1,
    math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 2.0, 1e9,
    True, False, "", " ", "0", "1", "-1", HUGE, f"{HUGE}s", f"{HUGE}ms", f"{HUGE}h", f"0.{HUGE}s",
    f"{HUGE}/s", f"1/{HUGE}s", f"{HUGE}/{HUGE}h", "0/s", "1/0s", "1/0.1ms", "1e999s", "1e999", "NaN", "inf",
    "-1s", "0s", "0ms", "0.0001ms", "1ms", "24h", "24h1ms", "86401s", "60s", "61s", f"{'9' * 20}h",
    "1" * 4000, "1" * 4000 + "s", "1" * 4000 + "/s", f"{HUGE}B", f"{HUGE}GiB", f"{HUGE}GiB/s", "1TiB",
    "1024GiB", "1025GiB", "2TiB", "1MB/s", "1MB", "1.5B", "20/s", "1000000/1ms", "1000001/s",
    "1/24h", "1/86401s", [], {}, [1], {"x": 1},
]  # fmt: skip


@pytest.mark.parametrize(("table", "key"), KEYS)
def test_every_extreme_is_refused_on_one_line_or_lies_in_the_range(table: str, key: str) -> None:
    for value in EXTREMES + edges(RANGES[table][key]):
        check_outcome(table, key, value)


def edges(limit: Range) -> list[object]:
    """The bounds of a range as the file could write them, and the values just outside."""
    low, high = limit.low, limit.high
    if limit.kind == "duration":
        return [low, high, float(high), f"{high}s", f"{high * 1000:.0f}ms", f"{high + 0.001}s", high + 1e-9,
                low - 1e-9, f"{low * 1000:.3f}ms", "0.5ms"]  # fmt: skip
    if limit.kind == "rate":
        return [f"{high:.0f}/1ms", f"{high + 1:.0f}/s", f"{low:.0f}/24h", "1/86400.001s", "1/0.999ms"]
    if limit.kind == "fraction":
        return [low, high, float(high), high + 1e-9, low - 1e-9]
    ints = [int(low), int(high), int(low) - 1, int(high) + 1, float(high)]
    if limit.kind == "size":
        return [*ints, f"{int(high)}B", f"{int(high) + 1}B"]
    if limit.kind == "bandwidth":
        return [*ints, f"{int(high)}B/s", f"{int(high) + 1}B/s"]
    return ints


@dataclass(frozen=True)
class Case:
    table: str
    key: str
    value: object


@st.composite
def extreme_cases(draw: st.DrawFn) -> Case:
    table, key = draw(st.sampled_from(KEYS))
    limit = RANGES[table][key]
    value = draw(st.one_of(
        st.sampled_from(EXTREMES), st.sampled_from(edges(limit)),
        st.integers(int(limit.low) - 2, int(limit.high) + 2), st.floats(limit.low, limit.high),
        st.integers(-(2**70), 2**70), st.floats(),
        st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{1,5})?(ms|s|m|h|B|KB|GiB)\Z"),
    ))  # fmt: skip
    return Case(table, key, value)


async def run_and_reload(table: str, key: str, values: list[object]) -> None:
    """Run a config with `key` = values[0], reload to the minimal config and to each other value and
    back; the balancer then relays an echo byte for byte."""
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, echo_handler)
        configs = [parse_config(place(table, key, value, backend.address)[0], SOURCE) for value in values]
        baseline = parse_config(minimal(backend.address), SOURCE)
        balancer = Balancer(configs[0])
        with trio.fail_after(EVENTUALLY):
            address = next(iter((await nursery.start(balancer.run)).values()))
            for config in (baseline, *configs[1:], *configs, baseline):
                await balancer.apply_config(config)
            payload = os.urandom(200_000)
            assert await request(address, payload) == payload
        nursery.cancel_scope.cancel()


@example(case=Case("listeners.*", "rate_per_client", "1000000/1ms"))
@example(case=Case("settings", "drain_timeout", 86400))
@given(case=extreme_cases())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_extreme_is_refused_on_one_line_or_runs_and_reloads(case: Case) -> None:
    accepted = check_outcome(case.table, case.key, case.value) is not None
    event("accepted" if accepted else "refused")
    if accepted:
        trio.run(run_and_reload, case.table, case.key, [case.value])


@example(first=1, width=1, again=65530, shape="{}-{}")  # the ends of the port numbers
@example(first=65534, width=1, again=1, shape="{}-{}")
@given(first=st.one_of(st.integers(1, 65531), st.integers(-1, 65536)),
       width=st.sampled_from([1, 2, 4, 0, -1]), again=st.integers(1, 65530),
       shape=st.sampled_from(["{}-{}"] * 6 + ["{}", " {}-{}", "{}-{}\n", "{}–{}", "{}-{}-{}"]))  # fmt: skip
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_spawn_port_range_is_refused_on_one_line_or_runs_and_reloads(
    first: int, width: int, again: int, shape: str,
) -> None:
    """`ports` is a range in a string, not a number of ranges.py: refused on one line naming it, or
    run, reloaded to another range (a roll) and to none and back, the balancer still relaying."""
    value = shape.format(first, first + width, first)
    data, path = place("pools.*.spawn", "ports", value)
    try:
        parse_config(data, SOURCE)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{SOURCE}: {path}: "), exc
        event("refused")
        return
    event("accepted")
    trio.run(run_and_reload, "pools.*.spawn", "ports", [value, f"{again}-{again + 5}"])


SIZED = [(table, key) for table, key in KEYS if RANGES[table][key].kind in ("size", "bandwidth")]


@pytest.mark.parametrize(("table", "key"), SIZED)
def test_the_top_of_a_size_or_bandwidth_range_reads_back_as_its_error_writes_it(table: str, key: str) -> None:
    """"must be a bandwidth from 0 to 1TiB/s": the operator who writes "1TiB/s" gets it."""
    limit = RANGES[table][key]
    top = limit.bounds().split(" to ")[1]
    parse = parse_bandwidth if limit.kind == "bandwidth" else parse_size
    assert parse(top) == limit.high, top


@pytest.mark.slow
@pytest.mark.parametrize(("table", "key"), KEYS)
def test_every_key_at_both_ends_of_its_range_runs_and_reloads(table: str, key: str) -> None:
    limit = RANGES[table][key]
    if limit.kind == "rate":
        ends: list[object] = [f"{limit.high:.0f}/1ms", f"{limit.low:.0f}/24h"]
    elif limit.kind == "duration" or limit.kind == "fraction":
        ends = [limit.high, limit.low]
    else:
        ends = [int(limit.high), int(limit.low)]
    trio.run(run_and_reload, table, key, ends)


# ------------------------------------------------------- the command line, with real processes

CHECKED = """
[settings]
drain_timeout = "1s"
[listeners.web]
bind = "127.0.0.1:0"
pool = "web"
[pools.web]
servers = ["127.0.0.1:9"]
"""


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "key"), [
    (("[pools.web]", f"[pools.web]\nidle_timeout = {HUGE}"), "pools.web.idle_timeout"),
    (('drain_timeout = "1s"', f"drain_timeout = {HUGE}"), "settings.drain_timeout"),
    (('pool = "web"', f'pool = "web"\nrate_per_client = "{HUGE}/s"'), "listeners.web.rate_per_client"),
    (("[pools.web]", '[pools.web]\nqueue_timeout = "1e999s"'), "pools.web.queue_timeout"),
    (("[pools.web]", "[pools.web]\nconnect_timeout = -inf"), "pools.web.connect_timeout"),
    (("[pools.web]", f'[pools.web.faults]\nbandwidth = "{HUGE}GiB/s"\n[pools.web]'),
     "pools.web.faults.bandwidth"),
    (("[pools.web]", f"[pools.web]\nretries = {2**63}"), "pools.web.retries"),
    pytest.param(("[pools.web]", f"[pools.web]\nmax_queued = {'9' * 5000}"), "invalid TOML",
                 marks=DIGIT_LIMIT),
    # Main read this one for hours (a regex quadratic in the digits; run_cli's deadline is 60 s).
    (("[pools.web]", f'[pools.web]\neject_for = "{"1" * 1_000_000}"'), "pools.web.eject_for"),
])  # fmt: skip
def test_anubis_check_refuses_an_extreme_with_one_line(
    tmp_path: Path, edit: tuple[str, str], key: str
) -> None:
    config = tmp_path / "anubis.toml"
    config.write_text(CHECKED.replace(*edit, 1))
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"anubis: {config}: {key}"), result.stderr
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 400 and "Traceback" not in result.stderr


WORKERS = """
[settings]
workers = 2
drain_timeout = "1s"
[listeners.web]
bind = "127.0.0.1:{port}"
pool = "web"
[pools.web]
servers = ["{server}"]
[pools.web.health]
check = "none"
"""


@pytest.mark.slow
async def test_workers_reload_extremes_and_keep_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Main's workers died in a loop on a reload to a 310-digit rate; a refused one now changes nothing,
    and an accepted extreme (every connection limit and timeout at its ceiling) is applied."""
    backend = await start_backend(nursery, echo_handler)
    port = free_port()
    config = tmp_path / "anubis.toml"
    text = WORKERS.format(port=port, server=backend.address)
    config.write_text(text)
    address = Address("127.0.0.1", port)
    async with anubis("run", "-c", str(config)) as process:
        assert process.stderr is not None
        await listening(port)
        seen = b""
        for extreme, outcome in [
            (f'rate_per_client = "{HUGE}/s"', b"reload rejected"),
            ('rate_per_client = "1000000/1ms"\nmax_connections = 10000000\nbacklog = 65535\n'
             'max_connections_per_client = 10000000\npeek_timeout = "24h"\n'
             'routes = [{ sni = "a.example", pool = "web" }]', b"reload applied in 2 of 2 workers"),
        ]:  # fmt: skip
            config.write_text(text.replace('pool = "web"', f'pool = "web"\n{extreme}', 1))
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(EVENTUALLY):
                while outcome not in seen:
                    seen += await process.stderr.receive_some()
            for _ in range(20):  # each from its own source port: both workers answer
                assert await request(address, b"echo") == b"echo"
        assert b"Traceback" not in seen and b"OverflowError" not in seen
        assert b"listeners.web.rate_per_client: must be a rate of 1 to 1000000" in seen


# ------------------------------------------------------- the admin's bodies, fuzzed


@dataclass(frozen=True)
class LiveAdmin:
    process: Any
    port: int


def blocking_exchange(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    head = f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=EVENTUALLY) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def live_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAdmin]:
    """`anubis run` with an admin endpoint: a real process, shared by the fuzzed examples."""
    import subprocess

    tmp = tmp_path_factory.mktemp("admin")
    admin, port = free_port(), free_port()
    config = tmp / "anubis.toml"
    config.write_text(f'[admin]\nbind = "127.0.0.1:{admin}"\n[listeners.web]\nbind = "127.0.0.1:{port}"\n'
                      f'pool = "web"\n[pools.web]\nservers = [{{ address = "127.0.0.1:9", name = "one" }}]\n'
                      '[pools.web.health]\ncheck = "none"\n')  # fmt: skip
    with (tmp / "stderr").open("wb") as stderr:
        process = subprocess.Popen([*ANUBIS, "run", "-c", str(config)], stderr=stderr, cwd=ROOT)
    try:
        trio.run(listening, admin)
        yield LiveAdmin(process, admin)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log = (tmp / "stderr").read_text()
        assert "Traceback" not in log and "internal error" not in log.lower(), log[-2000:]


async def listening(port: int) -> None:
    await (await connect_when_listening(port)).aclose()


def raw_number(value: object) -> str:
    """A JSON number as an attacker would write it, including what json.dumps would not."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


NUMBERS = st.one_of(
    st.sampled_from([v for v in EXTREMES if not isinstance(v, (list, dict))]).map(raw_number),
    st.sampled_from(["1" + "0" * 3000, "-" + "9" * 3000, "1e999", "-1e999", "1E400", "NaN", "Infinity",
                     "-Infinity", "0.0000001", "1e-400", "9" * 20, "1.5", "1e6", "1000000", "1000001"]),
    st.integers().map(str), st.floats().map(raw_number),
)  # fmt: skip
WEIGHT_BODIES = NUMBERS.map(lambda n: f'{{"weight": {n}}}')
FAULT_BODIES = st.dictionaries(st.sampled_from(list(RANGES["faults"])), NUMBERS, min_size=1, max_size=3).map(
    lambda table: "{" + ", ".join(f'"{key}": {number}' for key, number in table.items()) + "}"
)


@pytest.mark.slow
@example(body='{"latency": 1' + "0" * 3000 + "}")
@example(body='{"weight": ' + "9" * 4000 + "}")
@given(body=st.one_of(WEIGHT_BODIES, FAULT_BODIES))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_admin_bodies_with_numeric_extremes_are_400_or_200(live_admin: LiveAdmin, body: str) -> None:
    action = "weight" if body.startswith('{"weight"') else "faults"
    method = "POST" if action == "weight" else "PUT"
    path = f"/pools/web/servers/one/{action}"
    status, answer = blocking_exchange(live_admin.port, method, path, body.encode())
    assert status in (200, 400, 413), (status, answer[:300])
    event(f"{action} {status}")
    if status == 400:
        message = json.loads(answer)["error"]
        assert "\n" not in message and len(message) < 400, message
    assert blocking_exchange(live_admin.port, "GET", "/healthz")[0] == 200
    assert live_admin.process.poll() is None
