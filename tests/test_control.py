"""The runtime control plane (control.py, issue 28): every change an operator makes is a command that
reaches every worker, a server can be added and removed at runtime, the changes survive a reload and
(with state_file) a restart, and no input to the command decoder can do more than be refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    Backend,
    config_for,
    connect,
    echo_handler,
    ending,
    free_port,
    name_handler,
    process_logging_to,
    request,
    running_balancer,
    start_backend,
    wait_for_log,
    wait_until,
)
from tests.helpers import (
    ANUBIS,
    admin,
    all_serving,
    blocking_exchange,
    http,
    run_cli,
    stats,
    wait_listening,
    write_config,
)
from trioanubis.app import Balancer
from trioanubis.config import Address, Config, ServerConfig, parse_address, parse_config
from trioanubis.control import (
    AddServer,
    CommandError,
    Drain,
    RemoveServer,
    SetWeight,
    decode_command,
    encode_command,
)
from trioanubis.ops.admin import COMMAND_ROUTES, MAX_BODY, Pending, command_for
from trioanubis.state_file import state_document

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need a Unix")

# Connections per check: SO_REUSEPORT hashes each (by its source port) to one of the two workers, so
# every worker takes some (checked: a worker that took none would prove nothing).
ROUNDS = 40


async def answers(port: int, rounds: int = ROUNDS) -> list[bytes]:
    """What `rounds` fresh connections get back (b"" when the balancer closes one without a server)."""
    out = []
    for _ in range(rounds):
        try:
            out.append(await request(Address("127.0.0.1", port)))
        except trio.BrokenResourceError:  # closed with a reset: no server for it
            out.append(b"")
    return out


async def accepted(admin_port: int) -> list[int]:
    return [w["accepted"] for w in (await stats(admin_port))["workers"]]


@dataclass
class Step:
    """One command route exercised in workers mode: the request, then what every connection gets."""

    path: str
    body: bytes
    expect: set[bytes]  # what each of ROUNDS connections may get back
    untouched: tuple[str, ...] = ()  # backends that must see no connection meanwhile
    first: tuple[tuple[str, bytes], ...] = ()  # POSTs that set the scene (routes checked before)


DRAIN = ("POST", "/pools/{pool}/servers/{server}/drain")
ENABLE = ("POST", "/pools/{pool}/servers/{server}/enable")
WEIGHT = ("POST", "/pools/{pool}/servers/{server}/weight")
SET_FAULTS = ("PUT", "/pools/{pool}/servers/{server}/faults")
CLEAR_FAULTS = ("DELETE", "/pools/{pool}/servers/{server}/faults")
ADD = ("POST", "/pools/{pool}/servers")
REMOVE = ("DELETE", "/pools/{pool}/servers/{server}")


def steps(three: str) -> dict[tuple[str, str], Step]:
    """Each command route, in the order they run, with a check that fails unless every worker
    carried it out: each leaves the pool so that a worker that missed the command would answer
    differently (a server it should no longer use, or none where it should have one)."""
    one, two = "/pools/web/servers/one", "/pools/web/servers/two"
    zero, unit = (f"{one}/weight", b'{"weight": 0}'), (f"{one}/weight", b'{"weight": 1}')
    added = json.dumps({"address": three, "name": "three"}).encode()
    return {
        DRAIN: Step(f"{one}/drain", b"", {b"two"}, ("one",)),
        WEIGHT: Step(f"{two}/weight", b'{"weight": 0}', {b""}, ("one", "two")),  # nobody left: closed
        ENABLE: Step(f"{one}/enable", b"", {b"one"}, ("two",)),
        SET_FAULTS: Step(f"{one}/faults", b'{"refuse": true}', {b""}, ("one", "two")),  # refused connects
        CLEAR_FAULTS: Step(f"{one}/faults", b"", {b"one"}, ("two",)),
        ADD: Step("/pools/web/servers", added, {b"three"}, ("one", "two"), first=(zero,)),  # three alone
        REMOVE: Step("/pools/web/servers/three", b"", {b"one"}, ("two", "three"), first=(unit,)),
    }


@pytest.mark.slow
async def test_every_command_route_acts_in_every_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Finding 28: with workers = 2, PUT …/faults {"refuse": true} answered 200 and changed nothing in
    the workers (the supervisor forwarded POSTs only). Every route of the table, in workers mode."""
    backends = {n: await start_backend(nursery, name_handler(n), n) for n in ("one", "two", "three")}
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    servers = [{"address": backends[n].address, "name": n} for n in ("one", "two")]
    write_config(config, port, admin_port, [], access_log=False, pool="eject_after = 0")  # no ejection
    config.write_text(config.read_text().replace("servers = []", f"servers = {_toml(servers)}"))
    table = steps(backends["three"].address)
    assert set(table) == {(r.method, r.pattern) for r in COMMAND_ROUTES}, "a command route unchecked here"
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "log"):
        await all_serving(admin_port, 2)
        for key, step in table.items():
            for path, body in step.first:
                assert (await admin(admin_port, path, "POST", body))[0] == 200
            await _check(key, step, port, admin_port, backends)
        doc = await stats(admin_port)
    pool = doc["pools"][0]
    assert [s["name"] for s in pool["servers"]] == ["one", "two"]
    assert pool["servers"][0]["faults"] is None  # cleared
    for server in pool["servers"]:  # counted across workers: what the backends saw through us
        assert server["total"] == backends[server["name"]].connections, server


async def _check(key: tuple[str, str], step: Step, port: int, admin_port: int,
                 backends: dict[str, Backend]) -> None:  # fmt: skip
    status, body = await admin(admin_port, step.path, key[0], step.body)
    assert status in (200, 201), (key, status, body)
    seen = {name: backends[name].connections for name in step.untouched}
    before = await accepted(admin_port)
    got = await answers(port)
    after = await accepted(admin_port)
    assert set(got) <= step.expect, (key, sorted(set(got)))
    assert all(b > a for a, b in zip(before, after, strict=True)), (key, before, after)  # both served
    assert {name: backends[name].connections for name in step.untouched} == seen, key


def _toml(value: Any) -> str:
    """A list of tables as TOML inline tables."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.mark.slow
async def test_a_worker_that_restarts_serves_the_runtime_state_from_its_first_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A worker started again after a crash gets the commands in effect with its config, before it
    accepts: connections queued on its fresh socket while it starts see the runtime state too."""
    one = await start_backend(nursery, name_handler("one"), "one")
    three = await start_backend(nursery, name_handler("three"), "three")
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [one.address], access_log=False)
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "log"):
        doc = await all_serving(admin_port, 2)
        body = json.dumps({"address": three.address, "name": "three", "weight": 3}).encode()
        assert (await admin(admin_port, "/pools/web/servers", "POST", body))[0] == 201
        assert (await admin(admin_port, f"/pools/web/servers/{one.address}", "DELETE"))[0] == 200
        victim = doc["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        got: list[bytes] = []
        with trio.fail_after(EVENTUALLY):  # connect all along: some queue on the restarting worker's socket
            while True:
                try:
                    got += await answers(port, 10)
                except OSError:  # refused: a SYN the killed worker's socket had taken, as a reset is
                    got.append(b"")
                first = (await stats(admin_port))["workers"][0]
                if first["pid"] != victim and first["serving"] and first.get("accepted", 0) >= 5:
                    break
        got += await answers(port)
    # Without the runtime state it would send clients to one, the file's server. (Connections queued
    # on the killed worker's socket when it died are reset or refused: b"".)
    assert set(got) <= {b"three", b""} and got[-ROUNDS:] == [b"three"] * ROUNDS, sorted(set(got))
    assert one.connections == 0


# ------------------------------------------------------- a single process


def admin_data(servers: list[Any], **pool: Any) -> dict[str, Any]:
    data = config_for(servers, **pool)
    data["admin"] = {"bind": "127.0.0.1:0"}
    return data


@asynccontextmanager
async def running_balancer_from(
    data: Mapping[str, Any], source: Path
) -> AsyncIterator[tuple[Balancer, Address]]:
    """`running_balancer`, with the config said to come from the file `source` (the state file's owner)."""
    balancer = Balancer(parse_config(data, str(source)))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(balancer.run)
        yield balancer, next(iter(bound.values()))
        nursery.cancel_scope.cancel()


async def test_a_server_added_at_runtime_is_resolved_checked_and_served(nursery: trio.Nursery) -> None:
    one = await start_backend(nursery, name_handler("one"))
    late_port = free_port()  # nothing listens there yet: its health check keeps it down
    health = {"check": "tcp", "interval": "50ms", "rise": 1, "fall": 1}
    data = admin_data([{"address": one.address, "name": "one"}], health=health)
    async with running_balancer(data) as (b, address):
        api = b.admin_address
        assert api is not None
        body = json.dumps({"address": f"localhost:{late_port}", "name": "late", "weight": 2}).encode()
        status, _, answer = await http(api, "POST", "/pools/test/servers", body)
        assert status == 201, answer
        added = json.loads(answer)
        assert (added["name"], added["address"], added["weight"], added["state"]) == (
            "late", f"localhost:{late_port}", 2, "down")  # down until its first check passes
        late = b.pools["test"].find("late")
        assert late is not None and late.sockaddrs  # resolved (through getaddrinfo, in a thread)
        await wait_until(lambda: late.checks_failed > 0)  # checked like any other server
        assert {await request(address) for _ in range(6)} == {b"one"}
        await start_backend(nursery, name_handler("late"), port=late_port)
        await wait_until(lambda: late.healthy)
        assert {await request(address) for _ in range(6)} == {b"one", b"late"}


@pytest.mark.slow
async def test_a_removed_server_takes_no_new_connection_and_is_cut_after_drain_timeout(
    nursery: trio.Nursery,
) -> None:
    one = await start_backend(nursery, echo_handler, "one")
    two = await start_backend(nursery, name_handler("two"))
    data = admin_data([{"address": one.address, "name": "one"}, {"address": two.address, "name": "two"}],
                      settings={"drain_timeout": "1s"})  # fmt: skip
    async with running_balancer(data) as (b, address):
        api = b.admin_address
        assert api is not None
        held = await connect(address)  # round robin: one
        await held.send_all(b"x")
        assert await held.receive_some(1) == b"x"
        status, _, answer = await http(api, "DELETE", "/pools/test/servers/one")
        assert status == 200 and json.loads(answer)["state"] == "draining", answer
        assert {await request(address) for _ in range(4)} == {b"two"}
        await held.send_all(b"y")  # its open connection goes on ...
        assert await held.receive_some(1) == b"y"
        doc = json.loads((await http(api, "GET", "/stats"))[2])
        assert [s["name"] for s in doc["pools"][0]["retired"]] == ["one"]
        assert await ending(held) == "reset"  # ... until drain_timeout, then it is cut
        await held.aclose()
        await wait_until(lambda: not b.pools["test"].retired)
        assert (await http(api, "DELETE", "/pools/test/servers/one"))[0] == 404
        assert [s.name for s in b.pools["test"].servers] == ["two"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/pools/test/servers", b'{"address": "127.0.0.1:1", "weight": -1}', 400,
         "admin request: pools.test.servers[new].weight: must be an integer from 0 to 1000000, got -1"),
        ("POST", "/pools/test/servers", b'{"address": "127.0.0.1:1", "wieght": 2}', 400,
         "pools.test.servers[new].wieght: unknown key (did you mean 'weight'?)"),
        ("POST", "/pools/test/servers", b'{"address": "no port"}', 400, "pools.test.servers[new].address"),
        ("POST", "/pools/test/servers", b'{"address": "127.0.0.1:1", "faults": {"latency": "2h"}}', 400,
         "pools.test.servers[new].faults.latency: must be a duration from 0 to 60s"),
        ("POST", "/pools/test/servers", b'{"dns": "example.com:80"}', 400, "dns and srv entries"),
        ("POST", "/pools/test/servers", b'"127.0.0.1:9"', 409, 'already has a server "127.0.0.1:9"'),
        ("POST", "/pools/test/servers", b"[" * 10, 400, "nests"),
        ("POST", "/pools/nope/servers", b'"127.0.0.1:1"', 404, 'no pool "nope"'),
        ("DELETE", "/pools/test/servers/nope", b"", 404, 'has no server "nope"'),
        ("GET", "/pools/test/servers", b"", 405, "takes POST"),
        ("PUT", "/pools/test/servers/127.0.0.1:9", b"", 405, "takes DELETE"),
    ],
)
async def test_runtime_server_requests_are_checked_as_the_file_is(
    method: str, path: str, body: bytes, status: int, message: str
) -> None:
    async with running_balancer(admin_data(["127.0.0.1:9"])) as (b, _):
        got, _, answer = await http(b.admin_address, method, path, body)  # type: ignore[arg-type]
        assert [s.name for s in b.pools["test"].servers] == ["127.0.0.1:9"]  # nothing changed
    assert got == status and message in json.loads(answer)["error"], answer


# ------------------------------------------------------------ reloads


async def test_a_reload_keeps_runtime_changes_until_the_file_says_something_new() -> None:
    """What we chose (README: Runtime servers): the operator's word stands through a reload until
    the file changes what it says about that server; then the file's wins."""
    one, two, three = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"

    def file(*servers: Any) -> Config:
        return parse_config(admin_data(list(servers)), "test.toml")

    data = admin_data([{"address": one, "name": "one"}, {"address": two, "name": "two"}])
    async with running_balancer(data) as (b, _):
        pool = b.pools["test"]
        await b.command(AddServer("test", ServerConfig(parse_address(three), "three")))
        await b.command(RemoveServer("test", "one"))
        await b.command(SetWeight("test", "two", 5))
        await b.command(Drain("test", "two"))
        unchanged = file({"address": one, "name": "one"}, {"address": two, "name": "two"})
        await b.apply_config(unchanged)
        assert [(s.name, s.weight, s.draining) for s in pool.servers] == [
            ("two", 5, True), ("three", 1, False)]  # fmt: skip
        in_effect = b.control.in_effect()
        await b.apply_config(unchanged)
        assert b.control.in_effect() == in_effect  # nothing forgotten by a second reload
        # The file changes one's entry and two's weight, and now names three itself: the file's word.
        changed = file({"address": one, "name": "one", "weight": 2},
                       {"address": two, "name": "two", "weight": 3},
                       {"address": three, "name": "three", "weight": 4})  # fmt: skip
        runtime_three = pool.find("three")
        await b.apply_config(changed)
        assert sorted((s.name, s.weight, s.draining, s.source) for s in pool.servers) == [
            ("one", 2, False, ""), ("three", 4, False, ""), ("two", 3, True, "")]  # a drain stays, as ever
        assert pool.find("three") is runtime_three  # taken over, not replaced: no flap, counters kept
        assert b.control.in_effect() == [Drain("test", "two")]
        await b.apply_config(file({"address": two, "name": "two", "weight": 3}))  # one and three leave
        assert [s.name for s in pool.servers] == ["two"]
        assert b.control.in_effect() == [Drain("test", "two")]


@pytest.mark.slow
async def test_a_runtime_server_survives_a_reload_in_every_worker(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    three = await start_backend(nursery, name_handler("three"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [one.address], access_log=False)
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "log") as process:
        await all_serving(admin_port, 2)
        body = json.dumps({"address": three.address, "name": "three"}).encode()
        assert (await admin(admin_port, "/pools/web/servers", "POST", body))[0] == 201
        assert (await admin(admin_port, f"/pools/web/servers/{one.address}", "DELETE"))[0] == 200
        process.send_signal(signal.SIGHUP)  # the file is unchanged
        await wait_for_log(tmp_path / "log", "reload applied in 2 of 2 workers")
        before = await accepted(admin_port)
        assert set(await answers(port)) == {b"three"}
        assert all(b > a for a, b in zip(before, await accepted(admin_port), strict=True))
        assert one.connections == 0


# ------------------------------------------------------------ state_file


@pytest.mark.slow
async def test_runtime_changes_survive_a_restart_with_state_file(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """HAProxy's server-state-file idea: a restart forgot every drain and weight set at runtime."""
    names = ("one", "two", "gone", "three")
    backends = {name: await start_backend(nursery, name_handler(name), name) for name in names}
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    servers = [{"address": backends[n].address, "name": n} for n in ("one", "two", "gone")]
    write_config(config, port, admin_port, [], workers=1, access_log=False, state_file="state.json")
    config.write_text(config.read_text().replace("servers = []", f"servers = {_toml(servers)}"))
    changes = [
        ("/pools/web/servers", "POST", {"address": backends["three"].address, "name": "three", "weight": 2}),
        ("/pools/web/servers/two/drain", "POST", None),
        ("/pools/web/servers/one/weight", "POST", {"weight": 3}),
        ("/pools/web/servers/one/faults", "PUT", {"latency": "5ms"}),
        ("/pools/web/servers/gone", "DELETE", None),
    ]
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "first.log"):
        for path, method, body in changes:
            data = b"" if body is None else json.dumps(body).encode()
            status, answer = await admin(admin_port, path, method, data)
            assert status in (200, 201), answer
        before = await stats(admin_port)
    document = json.loads((tmp_path / "state.json").read_text())
    assert document["version"] == 1 and document["config"] == str(config)
    assert [c["op"] for c in document["commands"]] == ["add", "drain", "weight", "faults", "remove"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".anubis-state")]  # no temporary left
    log = tmp_path / "second.log"
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], log):
        after = await stats(admin_port)
        text = await wait_for_log(log, "listening on")
        got = set(await answers(port, 12))
    keep = ("name", "state", "weight", "faults")
    assert [{k: s[k] for k in keep} for s in after["pools"][0]["servers"]] == [
        {k: s[k] for k in keep} for s in before["pools"][0]["servers"]]
    assert [s["name"] for s in after["pools"][0]["servers"]] == ["one", "two", "three"]
    assert "5 of 5 runtime changes applied" in text
    assert text.index("runtime changes applied") < text.index("listening on")  # before anything serves
    assert got == {b"one", b"three"}


@pytest.mark.slow
async def test_the_supervisor_keeps_the_state_file_and_restarted_workers_all_apply_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one = await start_backend(nursery, name_handler("one"))
    two = await start_backend(nursery, name_handler("two"))
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [one.address, two.address], access_log=False,
                 state_file=str(tmp_path / "state.json"))  # fmt: skip
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "first.log"):
        await all_serving(admin_port, 2)
        assert (await admin(admin_port, f"/pools/web/servers/{one.address}/drain", "POST"))[0] == 200
    assert [c["op"] for c in json.loads((tmp_path / "state.json").read_text())["commands"]] == ["drain"]
    async with process_logging_to([*ANUBIS, "run", "-c", str(config)], tmp_path / "second.log"):
        await all_serving(admin_port, 2)
        before = await accepted(admin_port)
        assert set(await answers(port)) == {b"two"}
        assert all(b > a for a, b in zip(before, await accepted(admin_port), strict=True))
    assert one.connections == 0


STATE_FILES = {
    "not JSON": (b"{ half a docu", "not JSON"),
    "not ours": (b'{"hello": 1}', "not a state file"),
    "a future version": (b'{"version": 2, "config": "", "commands": []}', "format version 2"),
    "another config's": (b'{"version": 1, "config": "/elsewhere/anubis.toml", "commands": [{"op": "drain", '
                         b'"pool": "test", "server": "127.0.0.1:9"}]}', "written for another config file"),
    "a bad command": (None, "a command is not valid: weight must be an integer"),
    "too deep": (b"[" * 100_000, "nests deeper"),
    "not UTF-8": (b"\xff\xfe", "not UTF-8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STATE_FILES))
async def test_a_state_file_that_is_not_ours_is_one_log_line_and_ignored(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("trioanubis"), "propagate", True)
    state = tmp_path / "state.json"
    raw, why = STATE_FILES[case]
    if raw is None:
        raw = json.dumps({"version": 1, "config": str(tmp_path / "test.toml"), "commands": [
            {"op": "weight", "pool": "test", "server": "127.0.0.1:9", "weight": 10**30}]}).encode()
    state.write_bytes(raw)
    data = admin_data(["127.0.0.1:9"], settings={"state_file": str(state)})
    with caplog.at_level(logging.INFO, "trioanubis"):
        async with running_balancer_from(data, tmp_path / "test.toml") as (b, _):
            [server] = b.pools["test"].servers
            assert (server.name, server.weight, server.draining) == ("127.0.0.1:9", 1, False)
    lines = [r.getMessage() for r in caplog.records if "state_file" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0] and "ignored" in lines[0], lines
    assert state.read_bytes() == raw  # left as it was until the next change


async def test_what_the_config_no_longer_has_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("trioanubis"), "propagate", True)
    state = tmp_path / "state.json"
    commands = [Drain("test", "127.0.0.1:9"), Drain("gone", "x"), SetWeight("test", "left", 3),
                AddServer("test", ServerConfig(parse_address("127.0.0.1:9"), "127.0.0.1:9"))]  # fmt: skip
    state.write_bytes(state_document(commands, str(tmp_path / "test.toml")))
    data = admin_data(["127.0.0.1:9"], settings={"state_file": str(state)})
    with caplog.at_level(logging.INFO, "trioanubis"):
        async with running_balancer_from(data, tmp_path / "test.toml") as (b, _):
            assert b.pools["test"].servers[0].draining
    lines = [r.getMessage() for r in caplog.records if "state_file" in r.getMessage()]
    assert lines[:3] == [
        f'state_file {state}: no pool "gone" (pools: test); skipped',
        f'state_file {state}: pool "test" has no server "left" (servers: 127.0.0.1:9); skipped',
        f'state_file {state}: pool "test" already has a server "127.0.0.1:9"; skipped',
    ] and "1 of 4 runtime changes applied" in lines[3], lines
    assert [c["op"] for c in json.loads(state.read_text())["commands"]] == ["drain"]  # rewritten: what holds


@pytest.mark.slow
def test_anubis_check_refuses_a_state_file_it_could_not_write_and_names_a_good_one(tmp_path: Path) -> None:
    config = tmp_path / "anubis.toml"
    for value, ok in (("state.json", True), ("missing/state.json", False), (".", False)):
        write_config(config, 1, 2, ["127.0.0.1:3"], workers=1, state_file=value)
        result = run_cli("check", "-c", str(config))
        assert (result.returncode == 0) == ok, (value, result.stderr)
        if ok:
            assert f"state_file {tmp_path / 'state.json'}" in result.stdout
        else:
            assert "settings.state_file: " in result.stderr and result.stderr.count("\n") == 1, result.stderr


# ------------------------------------------------------------ fuzzing


huge = st.sampled_from(["x" * 100_000, "€" * 50_000, "\x00" * 1000, "9" * 5000])
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | huge
          | st.sampled_from([0, -1, 2**63, -(2**63), 10**400, 1e308, float("inf"), float("nan"), 1e-320]))
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["test", "web", "one", "127.0.0.1:9", ""]) | st.text(max_size=8) | huge | leaves
fault_keys = st.sampled_from(["latency", "jitter", "bandwidth", "refuse", "probability", "slice",
                              "slice_delay", "direction", "reset_after", "x"])  # fmt: skip
fault_tables = st.dictionaries(fault_keys, leaves | st.sampled_from(["200ms", "1MB/s", "2h", "both", "64KB"]),
                               max_size=4)  # fmt: skip
server_tables = st.fixed_dictionaries(
    {"address": st.sampled_from(["127.0.0.1:7", "[::1]:7", "x:0"]) | names},
    optional={"name": names, "weight": leaves, "priority": leaves, "max_connections": leaves,
              "backup": leaves, "send_proxy": leaves, "faults": fault_tables | leaves},
)  # fmt: skip
commands = st.fixed_dictionaries(
    {"op": st.sampled_from(["drain", "enable", "weight", "faults", "clear_faults", "add", "remove"]) | names},
    optional={"pool": names, "server": names | server_tables | st.just("127.0.0.1:7"), "weight": leaves,
              "faults": fault_tables | json_values},
) | json_values  # fmt: skip


@pytest.mark.slow
@given(commands)
@settings(max_examples=800, deadline=None)
def test_the_command_decoder_raises_only_command_errors(data: object) -> None:
    try:
        command = decode_command(data)
    except CommandError as exc:
        assert 400 <= exc.status < 500 and "\n" not in str(exc) and len(str(exc)) < 2000
        return
    wire = json.loads(json.dumps(encode_command(command), allow_nan=False))  # JSON, no NaN or infinity
    assert decode_command(wire) == command


@pytest.mark.slow
@given(st.sampled_from(COMMAND_ROUTES), names, names,
       st.binary(max_size=300) | commands.map(lambda v: json.dumps(v).encode(errors="surrogatepass")))
@settings(max_examples=800, deadline=None)
def test_the_admin_builds_a_command_or_answers_4xx_whatever_the_body(
    route: Any, pool: object, server: object, body: bytes
) -> None:
    parts = [p.replace("{pool}", str(pool)[:50]).replace("{server}", str(server)[:50])
             for p in route.pattern.strip("/").split("/")]  # fmt: skip
    answer = command_for(route.method, route.pattern, parts, body)
    if isinstance(answer, Pending):
        assert decode_command(encode_command(answer.command)) == answer.command
    else:
        assert answer is not None and 400 <= answer.status < 500, answer


@dataclass
class LiveWorkers:
    process: subprocess.Popen[bytes]
    port: int
    admin: int
    server: str  # the one server, "one", that every example must leave serving
    log: Path

    def call(self, method: str, path: str, body: bytes = b"") -> bytes:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n")  # fmt: skip
        return blocking_exchange(self.admin, head.encode() + body)


@pytest.fixture(scope="module")
def live_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWorkers]:
    """`anubis run` with workers = 2 in front of `anubis hello`: commands go through the channel."""
    tmp = tmp_path_factory.mktemp("live")
    hello_port, port, admin_port = free_port(), free_port(), free_port()
    config = tmp / "anubis.toml"
    write_config(config, port, admin_port, [], access_log=False, state_file="state.json")
    server = f"127.0.0.1:{hello_port}"
    entries = _toml([{"address": server, "name": "one"}])
    config.write_text(config.read_text().replace("servers = []", f"servers = {entries}"))
    log = tmp / "log"
    with open(log, "wb") as out:
        hello_command = [*ANUBIS, "hello", "--name", "one", "--host", "127.0.0.1", "--port", str(hello_port)]
        hello = subprocess.Popen(hello_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = subprocess.Popen([*ANUBIS, "run", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=out)
    try:
        for p in (hello_port, port, admin_port):
            wait_listening(p)
        yield LiveWorkers(process, port, admin_port, server, log)
    finally:
        for child in (process, hello):
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]


json_bodies = st.binary(max_size=200) | commands.map(lambda v: json.dumps(v).encode(errors="surrogatepass"))
# What each route's body usually is, give or take a value: the decoder's edges, not just bad JSON.
route_bodies = {
    "weight": st.fixed_dictionaries({"weight": st.integers(0, 3) | leaves}),
    "faults": fault_tables | st.sampled_from([{"latency": "1ms"}, {"refuse": True, "probability": 0.01}]),
    "servers": server_tables | st.sampled_from(["127.0.0.1:7", "localhost:7", "[::1]:7"])
               | st.builds(dict, address=st.just("127.0.0.1:7"), name=st.text(min_size=1, max_size=8)),
}


@st.composite
def admin_commands(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A command route's request: mostly its own method, pool web and server one, a body of its shape."""
    route = draw(st.sampled_from(COMMAND_ROUTES))
    method = draw(st.sampled_from([route.method] * 3 + ["POST", "PUT", "DELETE"]))
    pool, server = (draw(st.sampled_from([usual] * 8 + ["nope"])) if draw(st.integers(0, 9))
                    else str(draw(names))[:300] for usual in ("web", "one"))  # a tenth of them: anything
    path = route.pattern.replace("{pool}", pool).replace("{server}", server)
    shape = route_bodies.get(route.pattern.rstrip("/").rsplit("/", 1)[1])
    body = draw(json_bodies if shape is None else shape.map(lambda v: json.dumps(v).encode()) | json_bodies)
    return method, path, body


@pytest.mark.slow
@given(admin_commands())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_commands_never_stop_the_workers_and_every_worker_agrees(
    live_workers: LiveWorkers, request: tuple[str, str, bytes]
) -> None:
    live, (method, path, body) = live_workers, request
    answer = live.call(method, quote(path, safe="/:[]"), body)
    if not answer:  # a body over 4 KiB: refused (413) while we were still sending it, and closed
        assert len(body) > MAX_BODY
        return
    status = answer.split(b" ", 2)[1]
    event(f"{method} answered {status.decode()}")
    assert status in (b"200", b"201") or status.startswith(b"4"), answer[:300]  # no 500, no 503 (unconfirmed)
    assert live.process.poll() is None, live.log.read_text()[-3000:]
    _undo(live)
    proxied = blocking_exchange(live.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"hello from one" in proxied
    doc = json.loads(live.call("GET", "/stats").partition(b"\r\n\r\n")[2])
    assert all(w["serving"] and w["answered"] for w in doc["workers"]), doc["workers"]
    assert b"Traceback" not in live.log.read_bytes() and b"not applied" not in live.log.read_bytes()


def _undo(live: LiveWorkers) -> None:
    """Back to one server, "one", enabled, weight 1, no faults: whatever the example changed."""
    doc = json.loads(live.call("GET", "/stats").partition(b"\r\n\r\n")[2])
    for server in doc["pools"][0]["servers"]:
        if server["name"] != "one":
            assert b" 200 " in live.call("DELETE", "/pools/web/servers/" + quote(server["name"], safe=""))
    if not any(s["name"] == "one" for s in doc["pools"][0]["servers"]):
        entry = json.dumps({"address": live.server, "name": "one"}).encode()
        assert b" 201 " in live.call("POST", "/pools/web/servers", entry)
    for path, body in (("enable", b""), ("weight", b'{"weight": 1}')):
        assert b" 200 " in live.call("POST", f"/pools/web/servers/one/{path}", body)
    assert b" 200 " in live.call("DELETE", "/pools/web/servers/one/faults")
