"""Agent checks (health/agent_state.py, health/agent.py): the words, the state machine, a real agent
through a real balancer's /stats, hostile agents, and `workers = 2` through a subprocess."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    config_for,
    connect_when_listening,
    free_port,
    name_handler,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.helpers import anubis
from trioanubis.config import Address, AgentConfig, parse_config
from trioanubis.errors import ConfigError
from trioanubis.health.agent_state import (
    DOWN_WORDS,
    MAX_LINE,
    AgentLineError,
    AgentReply,
    AgentStatus,
    LineReader,
    Outcome,
    next_status,
    outcome_of,
    parse_reply,
)
from trioanubis.summary import describe

# ------------------------------------------------------------------ the words


@pytest.mark.parametrize(("line", "reply"), [
    (b"75%", AgentReply(percent=75)),
    (b"weight:30%", AgentReply(percent=30)),
    (b"250%", AgentReply(percent=100)),  # an agent lowers a weight, never raises it
    (b"DRAIN", AgentReply(admin="drain")),
    (b"up, ready\t50%", AgentReply(health="up", admin="ready", percent=50)),
    (b"down #disk full", AgentReply(health="down", reason="disk full")),
    (b"stopped#for the night", AgentReply(health="stopped", reason="for the night")),
    (b"fail maint 10% 20%", AgentReply(health="fail", admin="maint", percent=20)),  # the last one counts
    (b"maxconn:30 up", AgentReply(health="up", unknown="maxconn:30")),
    (b"7.5% weight:8", AgentReply(unknown="7.5%")),
    (b"", AgentReply()),
])  # fmt: skip
def test_words_as_haproxy_reads_them(line: bytes, reply: AgentReply) -> None:
    assert parse_reply(line) == reply


def test_a_line_ends_at_cr_or_lf_and_is_bounded() -> None:
    reader = LineReader()
    assert reader.feed(b"50") is None
    assert reader.feed(b"%\r\nignored") == b"50%"
    long = LineReader()
    with pytest.raises(AgentLineError, match="no line end within 512 bytes"):
        long.feed(b"x" * 10_000)
    with pytest.raises(AgentLineError, match="no line end within 512 bytes"):
        LineReader().feed(b"50%" * 200 + b"\n")  # a line end beyond the bound is never read
    assert LineReader().room == MAX_LINE
    assert "incomplete line 'up'" in str(_fed(b"up").eof())
    assert str(LineReader().eof()) == "closed without a reply"


def _fed(data: bytes) -> LineReader:
    reader = LineReader()
    reader.feed(data)
    return reader


def test_only_unknown_words_is_an_invalid_answer_an_empty_line_is_not() -> None:
    assert outcome_of(b"hello there").result == "invalid"
    assert outcome_of(b"").result == "ok"
    assert outcome_of(b"hello 50%").result == "ok"


# ------------------------------------------------------------ the state machine


def ok(line: bytes) -> Outcome:
    return outcome_of(line)


FAILED = Outcome("error", "refused")


def test_ready_ends_the_agents_drain_but_not_an_operators() -> None:
    status, actions = next_status(AgentStatus(), ok(b"drain"), draining=False, healthy=True, fall=3)
    assert actions.drain is True and status.drained
    status, actions = next_status(status, ok(b"ready"), draining=True, healthy=True, fall=3)
    assert actions.drain is False and not status.drained
    status, actions = next_status(AgentStatus(), ok(b"drain"), draining=True, healthy=True, fall=3)
    assert actions.drain is None and not status.drained  # the operator drained it first
    status, actions = next_status(status, ok(b"ready"), draining=True, healthy=True, fall=3)
    assert actions.drain is None


def test_up_takes_back_only_the_agents_own_down() -> None:
    status, actions = next_status(AgentStatus(), ok(b"fail #no db"), draining=False, healthy=True, fall=3)
    assert actions.down == "agent says fail (no db)" and status.state == "fail"
    status, actions = next_status(status, ok(b"up"), draining=False, healthy=False, fall=3)
    assert actions.release and status.state == "up"
    _, actions = next_status(AgentStatus(), ok(b"up"), draining=False, healthy=False, fall=3)
    assert not actions.release  # down for its checks or an ejection: not the agent's to undo


def test_failures_change_nothing_until_fall_then_the_agent_is_withdrawn() -> None:
    status, _ = next_status(AgentStatus(), ok(b"drain 40% down"), draining=False, healthy=True, fall=2)
    status, actions = next_status(status, FAILED, draining=True, healthy=False, fall=2)
    assert actions == type(actions)() and status.percent == 40 and status.down == "down"
    status, actions = next_status(status, FAILED, draining=True, healthy=False, fall=2)
    assert actions.drain is False and actions.release and not actions.down
    assert (status.percent, status.admin, status.down, status.failures) == (100, "", "", 2)
    assert status.counts() == {"ok": 1, "invalid": 0, "error": 2}


chunks = st.lists(st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"50%", b"down", b"up", b"ready", b"drain", b"maint", b"\n", b"\r", b",", b"#",
                     b"999999999999999999999999%", b"\x00", b"\xff\xfe"]),
    st.just(b"y" * 3000),
), max_size=12)  # fmt: skip


@pytest.mark.slow
@given(st.lists(st.tuples(chunks, st.booleans()), max_size=8), st.integers(1, 4))
@settings(max_examples=400, deadline=None)
def test_any_bytes_make_an_outcome_and_only_a_down_word_takes_a_server_down(
    rounds: list[tuple[list[bytes], bool]], fall: int
) -> None:
    status, healthy, draining = AgentStatus(), True, False
    for pieces, closes in rounds:
        outcome = _read(pieces, closes)
        status, actions = next_status(status, outcome, draining=draining, healthy=healthy, fall=fall)
        said_down = outcome.reply is not None and outcome.reply.health in DOWN_WORDS
        assert not actions.down or (said_down and outcome.result == "ok")
        assert 0 <= status.percent <= 100
        healthy = (healthy and not actions.down) or actions.release
        draining = draining if actions.drain is None else actions.drain


def _read(pieces: list[bytes], closes: bool) -> Outcome:
    """What ask_agent makes of these bytes, the connection closing after them or timing out."""
    reader = LineReader()
    try:
        for piece in pieces:
            line = reader.feed(piece)
            if line is not None:
                return outcome_of(line)
        if closes:
            raise reader.eof()
    except AgentLineError as exc:
        return Outcome("invalid", str(exc))
    return Outcome("error", "timeout")


# ------------------------------------------------------------------ config


def agent_data(agent: dict[str, Any]) -> dict[str, Any]:
    return config_for(["127.0.0.1:9"], health={"check": "tcp", "agent": agent})


@pytest.mark.slow
def test_agent_keys_and_their_defaults() -> None:
    config = parse_config(agent_data({"port": 9999, "send": "ping\\n"}), "t.toml").pools["test"].health
    assert config.agent == AgentConfig(port=9999, interval=2.0, timeout=1.0, send=b"ping\n")
    short = parse_config(agent_data({"port": 1, "interval": "200ms"}), "t.toml").pools["test"].health
    assert short.agent is not None and short.agent.timeout == 0.2  # never longer than the interval
    summary = describe(parse_config(agent_data({"port": 9999, "host": "10.0.0.9"}), "t.toml"))
    assert "agent on 10.0.0.9:9999 every 2s (timeout 1s)" in summary


@pytest.mark.slow
@pytest.mark.parametrize(("agent", "message"), [
    ({}, "pools.test.health.agent.port: is required"),
    ({"port": 0}, "agent.port: must be an integer from 1 to 65535"),
    ({"port": 1, "interval": "10ms"}, "agent.interval: must be a duration from 100ms to 1h"),
    ({"port": 1, "interval": "2h"}, "agent.interval: must be a duration from 100ms to 1h"),
    ({"port": 1, "timeout": "3s"}, r"agent.timeout: must not exceed interval \(2s\)"),
    ({"port": 1, "timeout": "1ms"}, "agent.timeout: must be a duration from 10ms to 60s"),
    ({"port": 1, "send": "x" * 2000}, "agent.send: is 2000 bytes, more than the 1024"),
    ({"port": 1, "host": "bad host"}, "agent.host:"),
    ({"port": 1, "inter": "2s"}, "agent.inter: unknown key"),
])  # fmt: skip
def test_agent_errors_name_the_key(agent: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"t\.toml: .*{message}"):
        parse_config(agent_data(agent), "t.toml")


values = st.one_of(st.integers(-5, 70_000), st.floats(allow_nan=True), st.text(max_size=12), st.booleans(),
                   st.sampled_from(["2s", "50ms", "1h", "\\xff\\n", "::1", "a..b"]),
                   st.lists(st.integers(), max_size=2))
agent_keys = st.sampled_from(["port", "host", "interval", "timeout", "send", "x"])


@pytest.mark.slow
@given(st.one_of(values, st.dictionaries(agent_keys, values, max_size=5)))
@settings(max_examples=300, deadline=None)
def test_any_agent_table_is_taken_or_refused_in_one_line_naming_it(agent: Any) -> None:
    try:
        config = parse_config(agent_data(agent), "t.toml").pools["test"].health.agent
    except ConfigError as exc:
        assert "\n" not in str(exc) and "pools.test.health.agent" in str(exc), str(exc)
    else:
        assert config is not None and 1 <= config.port <= 65535 and config.timeout <= config.interval


# ------------------------------------------------------------ a real agent


class Agent:
    """An agent in the test: each connection gets `line`, then the agent closes it."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(self.line)


async def get_json(address: Address, path: str) -> Any:
    """GET over HTTP/1.0 from the admin endpoint; the JSON body."""
    stream = await connect_when_listening(address.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], answer
    return json.loads(body) if path == "/stats" else body.decode()


async def stats_until(admin: Address, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first server of the first pool, as /stats shows it, once `wanted` holds for it."""
    with trio.fail_after(EVENTUALLY):
        while True:
            server: dict[str, Any] = (await get_json(admin, "/stats"))["pools"][0]["servers"][0]
            if wanted(server):
                return server
            await trio.sleep(0.02)


@pytest.mark.slow
async def test_the_agents_words_show_in_stats_and_a_silent_agent_is_withdrawn(nursery: trio.Nursery) -> None:
    """50% → drain → ready → down #reason → up → the agent goes away: each visible in /stats."""
    backend = await start_backend(nursery, name_handler("a"))
    agent = Agent(b"50%\n")
    agent_backend = await start_backend(nursery, agent.handle, "agent")
    health = {"check": "tcp", "interval": "100ms", "fall": 2,
              "agent": {"port": agent_backend.port, "interval": "100ms"}}  # fmt: skip
    data = config_for([{"address": backend.address, "name": "a", "weight": 4}], health=health)
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (balancer, address):
        admin = balancer.admin_address
        assert admin is not None
        s = await stats_until(admin, lambda s: s.get("agent", {}).get("percent") == 50)
        shown = (s["state"], s["effective_weight"], s["agent"]["weight"], s["agent"]["said"])
        assert shown == ("up", 2.0, 2.0, "'50%'")
        agent.line = b"drain\n"
        s = await stats_until(admin, lambda s: s["state"] == "draining")
        assert (s["agent"]["state"], s["effective_weight"]) == ("drain", 2.0)  # what it did not say stays
        agent.line = b"READY\r\n"
        await stats_until(admin, lambda s: s["state"] == "up" and s["agent"]["state"] == "up")
        agent.line = b"down #maintenance window\n"
        s = await stats_until(admin, lambda s: s["state"] == "down")
        assert s["agent"]["state"] == "down" and "maintenance window" in s["agent"]["said"]
        agent.line = b"up\n"
        await stats_until(admin, lambda s: s["state"] == "up" and s["agent"]["state"] == "up")
        agent_backend.stop()  # refused from now on: after `fall` failures its influence ends
        s = await stats_until(admin, lambda s: s["agent"]["percent"] == 100)
        assert (s["state"], s["effective_weight"], s["agent"]["result"]) == ("up", 4.0, "error")
        assert await request(address) == b"a"
        metrics = await get_json(admin, "/metrics")
        assert 'anubis_agent_checks_total{pool="test",server="a",result="ok"} ' in metrics
        assert 'anubis_agent_checks_total{pool="test",server="a",result="error"} ' in metrics


@pytest.mark.slow
async def test_with_check_none_the_agent_alone_takes_a_server_down_and_back(nursery: trio.Nursery) -> None:
    """No health check: the agent's down holds (the ejection retry does not undo it); its up ends it."""
    backend = await start_backend(nursery, name_handler("a"))
    agent = Agent(b"stopped #deploying\n")
    agent_backend = await start_backend(nursery, agent.handle, "agent")
    health = {"check": "none", "agent": {"port": agent_backend.port, "interval": "100ms"}}
    data = config_for([backend.address], health=health, eject_for="100ms")
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["test"]
        server = pool.servers[0]
        await wait_until(lambda: server.state == "down")
        states: list[str] = []

        async def watch() -> None:
            while True:
                await pool.wait_changed()
                states.append(server.state)

        nursery.start_soon(watch)
        connections = agent.connections
        await wait_until(lambda: agent.connections >= connections + 3)  # several eject_for periods
        assert server.state == "down" and "up" not in states, states
        agent.line = b"up\n"
        await wait_until(lambda: server.state == "up")
        assert await request(address) == b"a"


@pytest.mark.slow
async def test_a_reload_without_the_agent_ends_what_it_held(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    agent = Agent(b"drain 25%\n")
    agent_backend = await start_backend(nursery, agent.handle, "agent")
    health = {"check": "tcp", "interval": "100ms", "agent": {"port": agent_backend.port, "interval": "100ms"}}
    data = config_for([backend.address], health=health)
    async with running_balancer(data) as (balancer, address):
        server = balancer.pools["test"].servers[0]
        await wait_until(lambda: server.draining and server.effective_weight == 0.25)
        without = config_for([backend.address], health={"check": "tcp"})
        await balancer.apply_config(parse_config(without, "t.toml"))
        await wait_until(lambda: not server.draining and server.effective_weight == 1.0)
        assert server.agent is not None and server.agent.state == "up"
        assert await request(address) == b"a"


@pytest.mark.slow
async def test_without_an_agent_stats_and_metrics_are_as_before(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("a"))
    data = config_for([backend.address], health={"check": "tcp", "interval": "100ms"})
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (balancer, _):
        assert balancer.admin_address is not None
        server = (await get_json(balancer.admin_address, "/stats"))["pools"][0]["servers"][0]
        assert "agent" not in server
        assert "anubis_agent_checks_total" not in await get_json(balancer.admin_address, "/metrics")


# ------------------------------------------------------------ hostile agents


def no_down_word(script: tuple[list[bytes], float, bool]) -> bool:
    text = b"".join(script[0]).lower()
    return not any(word.encode() in text for word in DOWN_WORDS)


hostile_scripts = st.lists(
    st.tuples(chunks, st.sampled_from([0.0, 0.0, 0.04]), st.booleans()).filter(no_down_word),
    min_size=1, max_size=4,
)  # fmt: skip


class HostileAgent:
    """Plays one script per connection (chunks, a pause after each, then close or hold open);
    once they are played, answers "ready 100%" so the server serves again."""

    def __init__(self, scripts: list[tuple[list[bytes], float, bool]]) -> None:
        self.scripts = scripts
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        played = index < len(self.scripts)
        pieces, pause, hold = self.scripts[index] if played else ([b"ready 100%\n"], 0.0, False)
        async with stream:
            try:
                for piece in pieces:
                    await stream.send_all(piece)
                    await trio.sleep(pause)
                while hold and await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass


class DownLines(logging.Handler):
    """Keeps the pool's "server … is down" log lines: one per transition to down."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "is down" in record.getMessage():
            self.lines.append(record.getMessage())


async def _against_a_hostile_agent(scripts: list[tuple[list[bytes], float, bool]]) -> list[str]:
    handler = DownLines()
    logging.getLogger("trioanubis.pool").addHandler(handler)
    try:
        async with trio.open_nursery() as nursery:
            backend = await start_backend(nursery, name_handler("a"))
            agent = HostileAgent(scripts)
            agent_backend = await start_backend(nursery, agent.handle, "agent")
            agent_keys = {"port": agent_backend.port, "interval": "100ms", "timeout": "100ms"}
            health = {"check": "tcp", "interval": "1s", "fall": 2, "agent": agent_keys}
            async with running_balancer(config_for([backend.address], health=health)) as (balancer, address):
                server = balancer.pools["test"].servers[0]
                await wait_until(lambda: server.agent is not None and server.agent.said == "'ready 100%'")
                assert server.healthy and server.state == "up" and server.effective_weight == 1.0
                assert await request(address) == b"a"  # still serving
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("trioanubis.pool").removeHandler(handler)
    return handler.lines


@pytest.mark.slow
@given(hostile_scripts)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
def test_a_hostile_agent_never_crashes_the_balancer_nor_takes_a_server_down(
    scripts: list[tuple[list[bytes], float, bool]],
) -> None:
    """Arbitrary bytes, huge lines, no line end, a slow drip, a connection held open: the balancer
    goes on serving, and no server goes down (none of these lines says down, fail or stopped)."""
    assert trio.run(_against_a_hostile_agent, scripts) == []


# ------------------------------------------------------------ workers = 2


async def serve_named(nursery: trio.Nursery, host: str, name: str) -> int:
    """A backend on `host` (any 127.0.0.x) answering its name; its port."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    nursery.start_soon(trio.serve_listeners, name_handler(name), listeners)
    return int(listeners[0].socket.getsockname()[1])


async def workers_serving(admin: Address, count: int) -> None:
    with trio.fail_after(EVENTUALLY):
        while True:
            workers = (await get_json(admin, "/stats")).get("workers", [])
            if len(workers) == count and all(w["serving"] and w["answered"] for w in workers):
                return
            await trio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes need a Unix")
async def test_with_two_workers_the_supervisors_agent_drains_the_server_in_every_worker(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Server a's agent (on a's host) says drain: every worker stops sending a clients; b's host
    has no agent (refused), which changes nothing for b."""
    port_a = await serve_named(nursery, "127.0.0.1", "a")
    port_b = await serve_named(nursery, "127.0.0.2", "b")
    agent = Agent(b"up 100%\n")
    agent_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, agent.handle, agent_listeners)
    agent_port = agent_listeners[0].socket.getsockname()[1]
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    config.write_text(f"""
[settings]
workers = 2
access_log = false
[admin]
bind = "127.0.0.1:{admin_port}"
[listeners.web]
bind = "127.0.0.1:{port}"
pool = "web"
[pools.web]
servers = [{{ address = "127.0.0.1:{port_a}", name = "a" }}, {{ address = "127.0.0.2:{port_b}", name = "b" }}]
[pools.web.health]
check = "tcp"
interval = "100ms"
agent = {{ port = {agent_port}, interval = "100ms" }}
""")
    admin, web = Address("127.0.0.1", admin_port), Address("127.0.0.1", port)
    async with anubis("run", "-c", str(config)):
        await workers_serving(admin, 2)
        await stats_until(admin, lambda s: s.get("agent", {}).get("said") == "'up 100%'")
        assert {await request(web) for _ in range(20)} == {b"a", b"b"}
        agent.line = b"drain\n"
        s = await stats_until(admin, lambda s: s["state"] == "draining")
        assert s["agent"]["state"] == "drain"
        with trio.fail_after(EVENTUALLY):  # until both workers applied the supervisor's next state push
            while {await request(web) for _ in range(20)} != {b"b"}:
                pass
        assert {await request(web) for _ in range(40)} == {b"b"}  # new connections, spread over both workers
        doc = await get_json(admin, "/stats")
        assert doc["pools"][0]["servers"][1]["agent"]["result"] == "error"  # nothing listens on 127.0.0.2
        assert doc["pools"][0]["servers"][1]["state"] == "up"
        agent.line = b"ready\n"
        await stats_until(admin, lambda s: s["state"] == "up")
        with trio.fail_after(EVENTUALLY):
            while await request(web) != b"a":
                pass
        metrics = await get_json(admin, "/metrics")
        assert 'anubis_agent_checks_total{pool="web",server="a",result="ok"}' in metrics
