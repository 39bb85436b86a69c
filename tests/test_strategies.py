"""Strategies are pure code: tested with plain objects and Hypothesis properties."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioanubis.config import parse_config
from trioanubis.errors import ConfigError
from trioanubis.strategies import STRATEGIES, make_strategy
from trioanubis.strategies.base import load
from trioanubis.strategies.least_connections import LeastConnections
from trioanubis.strategies.least_time import LeastTime
from trioanubis.strategies.round_robin import RoundRobin, smooth_cycle
from trioanubis.strategies.source_hash import SourceHash
from trioanubis.strategies.weighted_random import PowerOfTwo, WeightedRandom


@dataclass(eq=False)
class FakeServer:
    name: str
    effective_weight: float = 1.0
    active: int = 0
    ewma: float | None = None

    @property
    def weight(self) -> float:
        return self.effective_weight


def servers_with(weights: Sequence[float]) -> tuple[FakeServer, ...]:
    return tuple(FakeServer(chr(ord("a") + i) if i < 26 else f"s{i}", w) for i, w in enumerate(weights))


def anything(server: FakeServer) -> bool:
    return True


def picks(strategy: object, servers: Sequence[FakeServer], count: int, key: bytes = b"") -> list[str]:
    out = []
    for _ in range(count):
        server = strategy.pick(servers, key, anything)  # type: ignore[attr-defined]
        assert server is not None
        out.append(server.name)
    return out


def nginx_smooth_cycle(weights: Sequence[int]) -> list[int]:
    """nginx's algorithm as written in ngx_http_upstream_get_peer, as the reference."""
    total, current, cycle = sum(weights), [0] * len(weights), []
    for _ in range(total):
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        cycle.append(best)
    return cycle


@pytest.mark.slow
@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_class_based_cycle_equals_nginx(weights: list[int]) -> None:
    assert smooth_cycle(weights) == nginx_smooth_cycle(weights)


def test_smooth_round_robin_matches_nginx() -> None:
    assert "".join(picks(RoundRobin(), servers_with([5, 1, 1]), 7)) == "aabacaa"
    assert "".join(picks(RoundRobin(), servers_with([1, 1, 1]), 6)) == "abcabc"


def test_round_robin_skips_unusable_and_weight_zero_never_appears() -> None:
    servers = servers_with([1, 1, 1])
    strategy: RoundRobin[FakeServer] = RoundRobin()
    names = [strategy.pick(servers, b"", lambda s: s.name != "b").name for _ in range(4)]  # type: ignore[union-attr]
    assert names == ["a", "c", "a", "c"]
    assert strategy.pick(servers, b"", lambda s: False) is None


weights_lists = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8)


@pytest.mark.slow
@given(weights_lists)
@settings(max_examples=200, deadline=None)
def test_round_robin_gives_exact_shares_and_no_needless_repeats(weights: list[int]) -> None:
    servers = servers_with(weights)
    cycle_length = len(smooth_cycle(weights))
    sequence = picks(RoundRobin(), servers, cycle_length * 2)
    counts = Counter(sequence[:cycle_length])
    total = sum(weights)
    for server, weight in zip(servers, weights, strict=True):
        assert counts[server.name] * total == weight * cycle_length
    by_name = {s.name: s.effective_weight for s in servers}
    for first, second in itertools.pairwise(sequence):
        if first == second:
            heavier_or_equal = [n for n, w in by_name.items() if n != first and w >= by_name[first]]
            assert not heavier_or_equal, (weights, sequence)


@pytest.mark.slow
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 10)), min_size=1, max_size=10),
    st.integers(0, 20),
)
def test_least_connections_never_picks_a_more_loaded_server(
    loads: list[tuple[int, int]], rotations: int
) -> None:
    servers = tuple(FakeServer(f"s{i}", w, active) for i, (active, w) in enumerate(loads))
    strategy: LeastConnections[FakeServer] = LeastConnections()
    for _ in range(rotations):
        strategy.pick(servers, b"", anything)
    picked = strategy.pick(servers, b"", anything)
    assert picked is not None
    assert all(load(picked) <= load(other) for other in servers)


@pytest.mark.slow
def test_least_connections_breaks_ties_round_robin() -> None:
    servers = servers_with([1, 1, 1])
    assert sorted(picks(LeastConnections(), servers, 3)) == ["a", "b", "c"]


def test_least_time_prefers_unmeasured_then_fastest() -> None:
    fast, slow, new = FakeServer("fast", ewma=0.01), FakeServer("slow", ewma=0.1), FakeServer("new")
    servers = (fast, slow, new)
    assert LeastTime().pick(servers, b"", anything) is new
    new.ewma = 0.5
    assert LeastTime().pick(servers, b"", anything) is fast
    fast.active = 20  # 0.01 × 21 = 0.21 > 0.1 × 1
    assert LeastTime().pick(servers, b"", anything) is slow


@pytest.mark.slow
@pytest.mark.parametrize("cls", [WeightedRandom, PowerOfTwo])
def test_random_shares_converge_to_weights(cls: type) -> None:
    weights = [5, 3, 1, 1]
    servers = servers_with(weights)
    counts = Counter(picks(cls(seed=7), servers, 100_000))
    for server, weight in zip(servers, weights, strict=True):
        share = counts[server.name] / 100_000
        assert share == pytest.approx(weight / sum(weights), abs=0.01)


def test_power_of_two_prefers_the_less_loaded_candidate() -> None:
    busy, idle = FakeServer("busy", active=10), FakeServer("idle", active=0)
    counts = Counter(picks(PowerOfTwo(seed=1), (busy, idle), 10_000))
    # idle wins whenever it is one of the two draws: 3 of 4 times
    assert counts["idle"] / 10_000 == pytest.approx(0.75, abs=0.02)


def keys(count: int) -> list[bytes]:
    rng = random.Random(42)
    return [rng.getrandbits(32).to_bytes(4, "big") for _ in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, 5, 10])
def test_source_hash_is_consistent_and_fair(count: int) -> None:
    servers = servers_with([1] * count)
    clients = keys(10_000)
    before = {k: SourceHash().pick(servers, k, anything) for k in clients[:10]}
    strategy: SourceHash[FakeServer] = SourceHash()
    assignment = {k: strategy.pick(servers, k, anything) for k in clients}
    assert all(assignment[k] is before[k] for k in before)  # same answer from a fresh table
    shares = Counter(s.name for s in assignment.values() if s)
    fair = len(clients) / count
    assert all(abs(n - fair) <= 0.2 * fair for n in shares.values()), shares
    for removed in range(count):
        rest = tuple(s for i, s in enumerate(servers) if i != removed)
        moved = sum(
            1
            for k in clients
            if assignment[k] is not servers[removed]
            and strategy.pick(rest, k, anything) is not assignment[k]
        )
        kept = sum(1 for k in clients if strategy.pick(rest, k, anything) is assignment[k])
        assert kept / len(clients) >= 1 - 1 / count - 0.05
        assert moved == 0 or moved / len(clients) < 0.05


def test_source_hash_falls_back_when_the_owner_is_unusable() -> None:
    servers = servers_with([1, 1, 1])
    strategy: SourceHash[FakeServer] = SourceHash()
    owner = strategy.pick(servers, b"\x7f\x00\x00\x01", anything)
    other = strategy.pick(servers, b"\x7f\x00\x00\x01", lambda s: s is not owner)
    assert other is not None and other is not owner
    assert strategy.pick(servers, b"\x7f\x00\x00\x01", lambda s: False) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_handles_empty_and_unusable(name: str) -> None:
    strategy = make_strategy(name)
    assert strategy.pick((), b"k", anything) is None
    assert strategy.pick(servers_with([1, 2]), b"k", lambda s: False) is None
    only = servers_with([1, 2])
    assert strategy.pick(only, b"k", lambda s: s.name == "b") is only[1]


# ------------------------------------------------------------ bounded loads


def bound_of(server: FakeServer, servers: Sequence[FakeServer], factor: float) -> int:
    """The definition (strategies/bounded.py), computed apart: ceil(c × (A + 1) × w / W), exactly."""
    placed = sum(s.active for s in servers) + 1
    weights = sum(Fraction(s.effective_weight) for s in servers)
    return math.ceil(Fraction(factor) * placed * Fraction(server.effective_weight) / weights)


arrivals_and_departures = st.lists(
    st.one_of(st.tuples(st.just("arrive"), st.integers(0, 40)),
              st.tuples(st.just("depart"), st.integers(0, 1000))),
    max_size=120,
)


@pytest.mark.slow
@given(
    st.lists(st.sampled_from([1.0, 1.0, 2.0, 3.0, 0.0625, 0.5, 7.0]), min_size=1, max_size=6),
    st.floats(min_value=1.0, max_value=4.0),
    arrivals_and_departures,
)
@settings(max_examples=300, deadline=None)
def test_bounded_source_hash_keeps_every_server_within_its_bound_and_clients_on_theirs(
    weights: list[float], factor: float, events: list[tuple[str, int]]
) -> None:
    """At every pick: the chosen server, with this connection, is within its bound; and a client
    whose own server (the unbounded hash's choice) is below its bound gets that server."""
    servers = servers_with(weights)
    bounded: SourceHash[FakeServer] = SourceHash(balance_factor=factor)
    plain: SourceHash[FakeServer] = SourceHash()
    open_connections: list[FakeServer] = []
    for kind, value in events:
        if kind == "depart":
            if open_connections:
                open_connections.pop(value % len(open_connections)).active -= 1
            continue
        key = value.to_bytes(4, "big")
        own = plain.pick(servers, key, anything)
        chosen = bounded.pick(servers, key, anything)
        assert own is not None and chosen is not None
        assert chosen.active + 1 <= bound_of(chosen, servers, factor)
        if own.active < bound_of(own, servers, factor):
            assert chosen is own
        chosen.active += 1
        open_connections.append(chosen)


@pytest.mark.slow
def test_bounded_source_hash_moves_only_the_overflow_and_always_to_the_same_next_server() -> None:
    """One hot client: it keeps its server up to the bound; the overflow goes where a failover
    from that server would go (the key's own order), the same way each time; idle, it is back."""
    def place(count: int) -> tuple[list[str], tuple[FakeServer, ...]]:
        servers = servers_with([1, 1, 1, 1])
        strategy: SourceHash[FakeServer] = SourceHash(balance_factor=1.25)
        placed = []
        for _ in range(count):
            server = strategy.pick(servers, hot, anything)
            assert server is not None
            server.active += 1
            placed.append(server.name)
        return placed, servers

    hot = b"\x0a\x00\x00\x01"
    reference = servers_with([1, 1, 1, 1])
    own = SourceHash().pick(reference, hot, anything)
    failover = SourceHash().pick(reference, hot, lambda s: s is not own)
    assert own is not None and failover is not None
    placed, servers = place(8)
    assert placed[:2] == [own.name, failover.name]
    assert placed.count(own.name) == 3  # its bound at the 8th pick: ceil(1.25 × 8 / 4) = 3
    assert place(8)[0] == placed  # the same moves every time
    for server in servers:  # load falls: the client is back on its own server
        server.active = 0
    assert SourceHash(balance_factor=1.25).pick(servers, hot, anything).name == own.name  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_bound_never_refuses_a_usable_server() -> None:
    """When every usable server is at its bound (the others full), the first usable one is taken."""
    servers = servers_with([1, 1])
    servers[0].active = 5
    strategy: SourceHash[FakeServer] = SourceHash(balance_factor=1.0)
    assert strategy.pick(servers, b"k", lambda s: s is servers[0]) is servers[0]


@pytest.mark.slow
@pytest.mark.parametrize(("value", "message"), [
    (0.5, "from 1 to 100"), (101, "from 0 to 100"), (float("nan"), "from 0 to 100"),
    ("1.25", "must be a number"), (True, "must be a number"),
])  # fmt: skip
def test_balance_factor_out_of_range_names_the_key(value: object, message: str) -> None:
    data = {"listeners": {"w": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:9"], "strategy": "source_hash", "balance_factor": value}}}
    with pytest.raises(ConfigError, match=rf"t\.toml: pools\.p\.balance_factor: .*{message}"):
        parse_config(data, "t.toml")


@pytest.mark.slow
@given(st.one_of(st.floats(allow_nan=True), st.integers(-10, 1000), st.text(max_size=5), st.booleans()),
       st.sampled_from(sorted(STRATEGIES)))
@settings(max_examples=200, deadline=None)
def test_any_balance_factor_is_taken_or_refused_in_one_line_naming_it(value: object, strategy: str) -> None:
    data = {"listeners": {"w": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:9"], "strategy": strategy, "balance_factor": value}}}
    try:
        factor = parse_config(data, "t.toml").pools["p"].balance_factor
    except ConfigError as exc:
        assert "\n" not in str(exc) and "pools.p.balance_factor" in str(exc), str(exc)
    else:
        assert factor == 0 or (strategy == "source_hash" and 1 <= factor <= 100)


def test_balance_factor_needs_a_hash_strategy() -> None:
    data = {"listeners": {"w": {"bind": "127.0.0.1:0", "pool": "p"}},
            "pools": {"p": {"servers": ["127.0.0.1:9"], "strategy": "round_robin", "balance_factor": 1.25}}}
    with pytest.raises(ConfigError, match=r"pools\.p\.balance_factor: strategy 'round_robin' does not bound"):
        parse_config(data, "t.toml")
    data["pools"]["p"]["strategy"] = "source_hash"  # type: ignore[index]
    assert parse_config(data, "t.toml").pools["p"].balance_factor == 1.25
    data["pools"]["p"]["balance_factor"] = 0  # type: ignore[index]
    assert parse_config(data, "t.toml").pools["p"].balance_factor == 0.0
