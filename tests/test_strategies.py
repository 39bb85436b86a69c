"""Strategies are pure code: tested with plain objects and Hypothesis properties."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
