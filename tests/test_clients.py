"""Address sets, per-client limits and once-a-minute logging, without sockets."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioanubis.config import parse_network
from trioanubis.proxy.clients import (
    COUNTED,
    MAX_TRACKED_CLIENTS,
    NOT_COUNTED,
    ClientTable,
    LogOnce,
    NetworkSet,
    address_key,
)


def networks(*texts: str) -> NetworkSet:
    return NetworkSet(parse_network(t) for t in texts)


def test_network_sets_match_ipv4_ipv6_and_mapped_addresses() -> None:
    nets = networks("10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1")
    assert "10.1.2.3" in nets and "192.0.2.7" in nets and "::1" in nets and "2001:db8::5" in nets
    assert "11.0.0.0" not in nets and "192.0.2.8" not in nets and "::2" not in nets
    assert "::ffff:10.9.9.9" in nets  # a dual-stack listener's IPv4 client
    assert "fe80::1%lo" not in nets and "2001:db8::1%eth0" in nets
    assert "not an address" not in nets and "" not in nets and 5 not in nets
    assert "10.1.2.3" in networks("::ffff:10.0.0.0/104")  # an IPv4 rule written mapped
    assert not networks() and "10.0.0.1" not in networks()


def test_overlapping_and_adjacent_networks_merge() -> None:
    nets = networks("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "0.0.0.0/0")
    assert all(host in nets for host in ("0.0.0.0", "10.0.1.255", "255.255.255.255"))
    assert "::1" not in nets


def _network(address: object, prefix: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network((address, prefix), strict=False)  # type: ignore[arg-type]


cidrs = st.one_of(
    st.builds(_network, st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(_network, st.ip_addresses(v=6), st.integers(0, 128)),
)


@pytest.mark.slow
@settings(max_examples=300)
@given(st.lists(cidrs, max_size=8), st.lists(st.ip_addresses(), min_size=1, max_size=8))
def test_network_sets_agree_with_ipaddress(
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    hosts: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    found = NetworkSet(nets)
    for host in hosts:
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [host]
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            candidates.append(host.ipv4_mapped)
        expected = any(c in n for c in candidates for n in nets if n.version == c.version) or any(
            isinstance(n, ipaddress.IPv6Network) and n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
            and ipaddress.IPv6Address(f"::ffff:{c}") in n for c in candidates if c.version == 4 for n in nets
        )  # fmt: skip
        assert (str(host) in found) == expected, (host, nets)


@given(st.text(max_size=60))
def test_any_text_as_an_address_never_raises(text: str) -> None:
    address_key(text)
    assert (text in networks("0.0.0.0/0", "::/0")) == (address_key(text) is not None)


# ------------------------------------------------------------------ limits


def test_open_connections_per_client_are_limited_and_released() -> None:
    table = ClientTable(max_connections=2)
    assert table.admit("192.0.2.7", 0.0) == ""
    assert table.admit("192.0.2.7", 0.0) == ""
    assert table.admit("192.0.2.7", 0.0) == "client_connections"
    assert table.admit("192.0.2.8", 0.0) == ""  # another client is not affected
    table.release("192.0.2.7")
    assert table.admit("192.0.2.7", 0.0) == ""
    for _ in range(2):
        table.release("192.0.2.7")
    table.release("192.0.2.8")
    assert table.active == {}  # no entry outlives a client's last connection
    table.release("198.51.100.1")  # never counted (a reload turned counting on): ignored
    assert table.active == {}


def test_the_rate_is_a_token_bucket_of_burst_count() -> None:
    table = ClientTable(rate=(20, 1.0))  # "20/s"
    admitted = [table.admit("c", 100.0) for _ in range(30)]
    assert admitted.count("") == 20 and admitted[20:] == ["client_rate"] * 10
    assert table.admit("c", 100.05) == "client_rate"  # 1 token needs 50 ms
    assert table.admit("c", 100.1) == ""  # refilled one (and 0.0 left after 100.05's refill)
    assert [table.admit("c", 200.0) for _ in range(21)].count("") == 20  # full again, never more
    table.release("c")  # releases touch only open-connection counts


def test_a_refused_connection_does_not_count_as_open() -> None:
    table = ClientTable(max_connections=5, rate=(1, 60.0))
    assert table.admit("c", 0.0) == ""
    assert table.admit("c", 1.0) == "client_rate"
    assert table.active == {"c": 1}


@pytest.mark.slow
def test_a_flood_of_100000_distinct_clients_keeps_the_table_bounded() -> None:
    table = ClientTable(max_connections=10, rate=(20, 1.0))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):  # all within one period: nothing expires on its own
            host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i % 2 else f"2001:db8::{i:x}"
            assert table.admit(host, 1000.0 + i * 1e-6) == ""
            table.release(host)
            assert len(table) <= MAX_TRACKED_CLIENTS
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(table) == MAX_TRACKED_CLIENTS  # no open connections; buckets at the cap
    assert table.evicted == 100_000 - MAX_TRACKED_CLIENTS
    assert grown < 4 * 1024 * 1024, f"{grown} bytes for {MAX_TRACKED_CLIENTS} buckets"
    # A period later every bucket is full again: a new client's arrival sweeps them all.
    table.admit("192.0.2.1", 1002.0)
    assert len(table) == 1


def test_expired_buckets_are_dropped_as_new_clients_arrive() -> None:
    table = ClientTable(rate=(5, 10.0), capacity=100)
    for i in range(50):
        table.admit(f"10.0.0.{i}", float(i))
        table.release(f"10.0.0.{i}")  # no open connection: only its bucket keeps it
    table.admit("10.0.1.1", 55.0)  # buckets stamped at 45.0 or before are full again
    assert len(table) == 4 + 1  # 46..49 and the new one
    assert table.evicted == 0


def test_reconfiguring_keeps_open_counts_and_drops_buckets_when_the_rate_goes() -> None:
    table = ClientTable(max_connections=1, rate=(1, 60.0))
    assert table.admit("c", 0.0) == ""
    table.configure(max_connections=2, rate=None)
    assert table.admit("c", 0.0) == "" and table.active == {"c": 2} and len(table) == 1
    assert table.admit("c", 0.0) == "client_connections"
    assert table.busiest(5) == [("c", 2)]


@pytest.mark.slow
@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans(), st.floats(0, 5)), max_size=200))
def test_the_table_never_admits_beyond_its_bounds(events: list[tuple[str, bool, float]]) -> None:
    table = ClientTable(max_connections=3, rate=(4, 2.0), capacity=2)
    now = 0.0
    open_: dict[str, int] = {}
    for client, release, step in events:
        now += step
        if release and open_.get(client):
            table.release(client)
            open_[client] -= 1
        else:
            answer = table.admit(client, now)
            if answer == COUNTED:
                open_[client] = open_.get(client, 0) + 1
            elif answer == NOT_COUNTED:  # only when every entry is a client with open connections
                assert len(table.active) == 2
        assert open_.get(client, 0) <= 3
        assert table.active == {k: v for k, v in open_.items() if v}
        assert len(table) <= 2
        assert all(0.0 <= tokens <= 4.0 for tokens in table.tokens())


# ----------------------------------------------------------------- logging


def test_a_refused_client_is_logged_once_a_minute() -> None:
    once = LogOnce()
    assert once.should_log("10.0.0.1", 0.0)
    assert not once.should_log("10.0.0.1", 59.9)
    assert once.should_log("10.0.0.2", 30.0)
    assert once.should_log("10.0.0.1", 60.0)
    assert not once.should_log("10.0.0.2", 60.0)


def test_a_flood_of_refusals_is_counted_not_logged() -> None:
    once = LogOnce(capacity=100)
    logged = sum(once.should_log(f"10.0.{i >> 8}.{i & 255}", 0.0) for i in range(10_000))
    assert logged == 100 and once.suppressed == 9_900 and len(once.logged) == 100
    assert once.should_log("10.0.0.1", 61.0)  # the next minute logs again
    assert len(once.logged) == 1
