"""Servers from DNS, against a real DNS server on loopback whose answers change mid-run."""

from __future__ import annotations

import logging
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    EVENTUALLY,
    free_port,
    name_handler,
    request,
    running_balancer,
    start_backend,
    wait_until,
)
from tests.dnsserver import Zone
from tests.peers import need
from trioanubis import discovery
from trioanubis.config import ConfigError, parse_config
from trioanubis.discovery import MAX_FOUND

HOSTS = ("127.0.0.2", "127.0.0.3")  # loopback addresses: one port, several "pods"


async def start_pods(nursery: trio.Nursery, port: int = 0) -> tuple[int, dict[str, Any]]:
    """A backend named after its address on each of HOSTS, all on one port."""
    pods: dict[str, Any] = {}
    for host in HOSTS:
        listeners = await trio.open_tcp_listeners(port, host=host)
        port = listeners[0].socket.getsockname()[1]
        counter = {"connections": 0}

        def handler_for(host: str, counter: dict[str, int]) -> Any:
            inner = name_handler(host)

            async def handler(stream: trio.SocketStream) -> None:
                counter["connections"] += 1
                await inner(stream)

            return handler

        nursery.start_soon(trio.serve_listeners, handler_for(host, counter), listeners)
        pods[host] = counter
    return port, pods


def discovery_config(dns_port: int, servers: list[Any], **pool: Any) -> dict[str, Any]:
    return {
        "listeners": {"api": {"bind": "127.0.0.1:0", "pool": "api"}},
        "pools": {"api": {"servers": servers, "resolver": f"127.0.0.1:{dns_port}",
                          "health": {"check": "none"}, **pool}},
    }  # fmt: skip


async def test_traffic_follows_the_records_with_no_failed_request(nursery: trio.Nursery) -> None:
    zone = Zone()
    dns_port = await nursery.start(zone.serve)
    port, pods = await start_pods(nursery)
    zone.set("api.test", "A", HOSTS[0])
    data = discovery_config(dns_port, [{"dns": f"api.test:{port}", "refresh": "100ms"}])
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["api"]
        assert [s.name for s in pool.servers] == [f"{HOSTS[0]}:{port}"]
        answers: list[bytes] = []

        async def until(predicate: Any) -> None:
            with trio.fail_after(20):
                while not predicate():
                    answers.append(await request(address))

        await until(lambda: len(answers) >= 5)
        zone.set("api.test", "A", *HOSTS)  # a pod joins
        await until(lambda: HOSTS[1].encode() in answers)
        zone.set("api.test", "A", HOSTS[1])  # the first leaves
        await until(lambda: [s.name for s in pool.servers] == [f"{HOSTS[1]}:{port}"])
        seen_first = pods[HOSTS[0]]["connections"]
        answers.clear()
        await until(lambda: len(answers) >= 10)
        assert set(answers) == {HOSTS[1].encode()}  # no new connection to the vanished pod
        assert pods[HOSTS[0]]["connections"] == seen_first
    assert b"" not in answers


async def test_srv_weights_become_server_weights(nursery: trio.Nursery) -> None:
    zone = Zone()
    dns_port = await nursery.start(zone.serve)
    port, _ = await start_pods(nursery)
    zone.set("_http._tcp.api.test", "SRV", f"0 3 {port} a.test.", f"0 1 {port} b.test.")
    zone.set("a.test", "A", HOSTS[0])
    zone.set("b.test", "A", HOSTS[1])
    data = discovery_config(dns_port, [{"srv": "_http._tcp.api.test", "refresh": "10s"}])
    async with running_balancer(data) as (balancer, address):
        weights = {s.name: s.weight for s in balancer.pools["api"].servers}
        assert weights == {f"{HOSTS[0]}:{port}": 3, f"{HOSTS[1]}:{port}": 1}
        counts = Counter([await request(address) for _ in range(8)])
        assert counts == {HOSTS[0].encode(): 6, HOSTS[1].encode(): 2}


@pytest.mark.slow
async def test_a_resolver_that_stops_answering_leaves_the_last_good_set(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("trioanubis").propagate = True
    zone = Zone()
    dns_port = await nursery.start(zone.serve)
    port, _ = await start_pods(nursery)
    zone.set("api.test", "A", *HOSTS)
    data = discovery_config(dns_port, [{"dns": f"api.test:{port}", "refresh": "100ms"}])
    async with running_balancer(data) as (balancer, address):
        zone.silent = True
        asked = zone.queries
        await wait_until(lambda: zone.queries >= asked + 4)  # several lookups went unanswered
        await wait_until(lambda: "DNS lookup failed" in caplog.text)
        assert len(balancer.pools["api"].servers) == 2
        assert {await request(address) for _ in range(4)} == {h.encode() for h in HOSTS}
        zone.silent = False
        zone.set("api.test", "A", HOSTS[0])
        await wait_until(lambda: len(balancer.pools["api"].servers) == 1)
    assert caplog.text.count("DNS lookup failed") == 1  # logged once, not every refresh


async def test_static_and_discovered_servers_mix(nursery: trio.Nursery) -> None:
    zone = Zone()
    dns_port = await nursery.start(zone.serve)
    port, _ = await start_pods(nursery)
    static = await start_backend(nursery, name_handler("static"))
    zone.set("api.test", "A", HOSTS[0])
    data = discovery_config(dns_port, [static.address, {"dns": f"api.test:{port}", "refresh": "10s"}])
    async with running_balancer(data) as (_, address):
        assert {await request(address) for _ in range(4)} == {b"static", HOSTS[0].encode()}


def test_discovery_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]: give either dns or srv, not both"):
        parse_config(discovery_config(53, [{"dns": "a:1", "srv": "_x._tcp.a"}]))
    with pytest.raises(ConfigError, match=r"servers\[0\]\.refresh: must be a duration"):
        parse_config(discovery_config(53, [{"dns": "a:1", "refresh": "often"}]))
    with pytest.raises(ConfigError, match=r"pools\.api\.resolver: the port must be"):
        parse_config(discovery_config(0, [{"dns": "a:1"}]))
    config = parse_config(discovery_config(53, [{"srv": "_http._tcp.a", "refresh": "5s"}]))
    entry = config.pools["api"].discovery[0]
    assert (entry.kind, entry.name, entry.refresh) == ("srv", "_http._tcp.a", 5.0)




@pytest.mark.slow
async def test_a_refused_aaaa_keeps_the_a_answer_and_says_which_family_failed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("trioanubis").propagate = True
    caplog.set_level(logging.INFO, logger="trioanubis")  # "works again" is a normal change: INFO
    zone = Zone()
    dns_port = await nursery.start(zone.serve)
    port, _ = await start_pods(nursery)
    zone.set("api.test", "A", HOSTS[0])
    zone.refused = {"AAAA"}  # dnsmasq with no upstream, for a name it has only an A record of
    data = discovery_config(dns_port, [{"dns": f"api.test:{port}", "refresh": "100ms"}])
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["api"]
        assert [s.name for s in pool.servers] == [f"{HOSTS[0]}:{port}"]
        assert await request(address) == HOSTS[0].encode()
        asked = zone.queries
        await wait_until(lambda: zone.queries >= asked + 6)  # several refreshes, AAAA refused each time
        zone.refused = {"A"}  # now A fails: its last good answer stays, AAAA's joins
        zone.set("api.test", "AAAA", "::1")
        await wait_until(lambda: len(pool.servers) == 2)
        assert {s.name for s in pool.servers} == {f"{HOSTS[0]}:{port}", f"[::1]:{port}"}
        zone.refused = set()
        await wait_until(lambda: "A api.test works again" in caplog.text)
    assert "DNS lookup failed" not in caplog.text
    assert caplog.text.count("AAAA api.test: NoNameservers") == 1  # once per change, not per refresh
    assert "REFUSED" in caplog.text
    assert caplog.text.count("AAAA api.test works again") == 1


def _free_udp_and_tcp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq listens on both)."""
    while True:
        port = free_port()  # TCP-free, and this worker's own (conftest)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


async def _start_dnsmasq(nursery: trio.Nursery, *records: str) -> int:
    """A real dnsmasq on 127.0.0.1 with no upstream and no /etc/hosts, answering `records`.

    Started again on another port if it exits at once (another process took the port meanwhile).
    """
    command = [need("dnsmasq"), "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
               "--pid-file=", "--user=", "--group=", "--listen-address=127.0.0.1", "--bind-interfaces",
               *(f"--host-record={r}" for r in records)]  # fmt: skip
    for _ in range(5):
        port = _free_udp_and_tcp_port()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        process = await trio.lowlevel.open_process([*command, f"--port={port}"], **quiet)
        nursery.start_soon(_terminate_at_the_end, process)
        if await _answers(port, records[0].split(",")[0], process):
            return port
    raise AssertionError("dnsmasq did not start")


async def _terminate_at_the_end(process: trio.Process) -> None:
    try:
        await trio.sleep_forever()
    finally:
        if process.returncode is None:
            process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()


async def _answers(port: int, name: str, process: trio.Process) -> bool:
    """Wait until the dnsmasq on `port` answers for `name`; False if it exited instead."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], port
    with trio.fail_after(EVENTUALLY):
        while process.poll() is None:
            try:
                await resolver.resolve(name, "A", lifetime=0.5)
                return True
            except dns.exception.DNSException:
                await trio.sleep(0.05)
    return False


@pytest.mark.slow
async def test_a_name_with_only_an_a_record_on_a_real_dnsmasq(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("trioanubis").propagate = True
    port, _ = await start_pods(nursery)
    dns_port = await _start_dnsmasq(nursery, f"api.test,{HOSTS[0]}")  # no upstream: AAAA is REFUSED
    data = discovery_config(dns_port, [{"dns": f"api.test:{port}", "refresh": "10s"}])
    async with running_balancer(data) as (balancer, address):
        assert [s.name for s in balancer.pools["api"].servers] == [f"{HOSTS[0]}:{port}"]
        assert await request(address) == HOSTS[0].encode()
    assert "AAAA api.test" in caplog.text and "REFUSED" in caplog.text  # says which family failed


# ------------------------------------------------------------------ hostile answers

NAMES = ("api.test.", "other.test.", "loop.test.", ".")


@st.composite
def forged_answers(draw: st.DrawFn) -> Callable[[dns.message.Message], bytes]:
    """A DNS server's answer, from random bytes to well-formed messages full of odd records."""
    kind = draw(st.sampled_from(["bytes", "message"]))
    if kind == "bytes":
        tail = draw(st.binary(max_size=600))
        keep_id = draw(st.booleans())  # with the query's id, dnspython reads further into it
        return lambda query: (query.id.to_bytes(2, "big") if keep_id else b"") + tail
    rcode = draw(st.integers(0, 15))
    flags = draw(st.integers(0, 0xFFFF))
    records = draw(st.lists(_records(), max_size=40))
    ttl = draw(st.integers(0, 2**31 - 1))

    def forge(query: dns.message.Message) -> bytes:
        response = dns.message.make_response(query)
        response.flags = (flags & ~0x780F) | dns.flags.QR  # opcode stays QUERY; rcode below
        response.set_rcode(dns.rcode.Rcode(rcode))
        for name, kind, text in records:
            owner = query.question[0].name.to_text() if name == "api.test." else name
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", kind, text))
        return response.to_wire()

    return forge


def _records() -> st.SearchStrategy[tuple[str, str, str]]:
    port, number = st.integers(0, 65535), st.integers(0, 65535)
    return st.one_of(
        st.tuples(st.sampled_from(NAMES), st.just("A"), st.ip_addresses(v=4).map(str)),
        st.tuples(st.sampled_from(NAMES), st.just("AAAA"), st.ip_addresses(v=6).map(str)),
        st.tuples(st.sampled_from(NAMES), st.just("SRV"),
                  st.builds("{} {} {} {}".format, number, number, port, st.sampled_from(NAMES))),
        st.tuples(st.sampled_from(NAMES), st.just("CNAME"), st.sampled_from(NAMES)),
        st.tuples(st.sampled_from(NAMES), st.just("TXT"), st.text("ab; ", max_size=200).map('"{}"'.format)),
    )  # fmt: skip


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "internal error" in record.getMessage():
            self.lines.append(record.getMessage())


@pytest.mark.slow
@given(answers=st.lists(forged_answers(), min_size=1, max_size=4), srv=st.booleans())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_hostile_dns_answers_never_stop_the_balancer(
    answers: list[Callable[[dns.message.Message], bytes]], srv: bool
) -> None:
    zone = Zone()
    asked = iter(answers)
    zone.forge = lambda query: next(asked, answers[-1])(query)
    errors = _Errors()
    logging.getLogger("trioanubis").addHandler(errors)
    try:
        async with trio.open_nursery() as nursery:
            dns_port = await nursery.start(zone.serve)
            static = await start_backend(nursery, name_handler("static"))
            entry = {"srv": "api.test"} if srv else {"dns": "api.test:80"}
            data = discovery_config(dns_port, [static.address])
            data["pools"]["found"] = {"servers": [{**entry, "refresh": "100ms"}], "health": {"check": "none"},
                                      "resolver": f"127.0.0.1:{dns_port}"}  # fmt: skip
            async with running_balancer(data) as (balancer, address):
                await wait_until(lambda: zone.queries >= len(answers) + 2)  # each answer, and then some
                assert await request(address) == b"static"
                assert len(balancer.pools["found"].servers) <= MAX_FOUND
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("trioanubis").removeHandler(errors)
    assert errors.lines == []  # every answer was handled as an answer, not caught as a bug


# ------------------------------------------------------------- names the system knows


async def test_localhost_resolves_the_way_the_system_does_with_no_resolver(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery, name_handler("local"))
    data = discovery_config(0, [{"dns": f"localhost:{backend.port}", "refresh": "10s"},
                                {"dns": f"127.0.0.3:{backend.port}", "refresh": "10s"}])  # fmt: skip
    del data["pools"]["api"]["resolver"]  # no resolver: getaddrinfo, as every other program here
    expected = {a[4][0] for a in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)}
    async with running_balancer(data) as (balancer, address):
        hosts = {s.address.host for s in balancer.pools["api"].servers}
        assert hosts == expected | {"127.0.0.3"} and "127.0.0.1" in hosts
        assert await request(address) == b"local"  # failover passes over ::1 or 127.0.0.3 if need be


async def test_a_hosts_file_name_resolves_from_the_file_even_with_a_resolver(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# a comment\n{HOSTS[0]} pods.test  # first\n"
                     f"{HOSTS[1]}\tpods.test other\nbad pods.test\n")
    monkeypatch.setattr(discovery, "HOSTS_FILE", str(hosts))
    zone = Zone()  # knows nothing: every name is NXDOMAIN there
    dns_port = await nursery.start(zone.serve)
    port, _ = await start_pods(nursery)
    data = discovery_config(dns_port, [{"dns": f"PODS.test:{port}", "refresh": "100ms"}])
    async with running_balancer(data) as (balancer, address):
        pool = balancer.pools["api"]
        assert {s.name for s in pool.servers} == {f"{h}:{port}" for h in HOSTS}
        assert {await request(address) for _ in range(4)} == {h.encode() for h in HOSTS}
        hosts.write_text(f"{HOSTS[1]} pods.test\n")  # read again at each refresh
        await wait_until(lambda: [s.name for s in pool.servers] == [f"{HOSTS[1]}:{port}"])
    assert zone.queries == 0


def test_hosts_table_reads_what_the_system_reads() -> None:
    text = ("127.0.0.1 localhost\n::1 localhost ip6-localhost # v6\n\n# 10.0.0.1 gone\n"
            "not-an-ip name\n10.0.0.2 A.Test.\n")
    assert discovery.hosts_table(text) == {
        "localhost": ["127.0.0.1", "::1"], "ip6-localhost": ["::1"], "a.test": ["10.0.0.2"],
    }  # fmt: skip
