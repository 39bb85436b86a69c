"""Servers from DNS, against a real DNS server on loopback whose answers change mid-run."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
import trio

from tests.conftest import name_handler, request, running_balancer, start_backend, wait_until
from tests.dnsserver import Zone
from trioanubis.config import ConfigError, parse_config

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


