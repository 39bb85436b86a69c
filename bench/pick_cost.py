"""Micro-benchmark: the cost of one pick per strategy, at 10 and 1,000 servers.

    python bench/pick_cost.py

Prints a Markdown table of microseconds per pick (median of 5 runs), and the
one-off cost of rebuilding the strategy's tables after a membership change.
Not a test: figures depend on the machine; compare rows, not absolutes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from trioanubis.strategies import STRATEGIES, make_strategy


@dataclass(eq=False)
class Server:
    name: str
    effective_weight: float
    weight: float
    active: int = 0
    ewma: float | None = None


def servers(count: int) -> tuple[Server, ...]:
    return tuple(
        Server(f"s{i}", float(1 + i % 3), float(1 + i % 3), active=i % 7, ewma=0.001 * (1 + i % 5))
        for i in range(count)
    )


def usable(server: Server) -> bool:
    return True


def per_pick(name: str, pool: tuple[Server, ...], picks: int) -> tuple[float, float]:
    strategy = make_strategy(name)
    start = time.perf_counter()
    strategy.pick(pool, b"\x7f\x00\x00\x01", usable)  # builds tables
    rebuild = time.perf_counter() - start
    keys = [i.to_bytes(4, "big") for i in range(picks)]
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for key in keys:
            strategy.pick(pool, key, usable)
        runs.append((time.perf_counter() - start) / picks)
    return statistics.median(runs) * 1e6, rebuild * 1e3


def main() -> None:
    print("| strategy | µs/pick, 10 servers | µs/pick, 1,000 servers | rebuild ms, 10 | rebuild ms, 1,000 |")
    print("|---|---|---|---|---|")
    for name in STRATEGIES:
        small, small_rebuild = per_pick(name, servers(10), 20_000)
        large, large_rebuild = per_pick(name, servers(1000), 2_000)
        print(f"| {name} | {small:.2f} | {large:.2f} | {small_rebuild:.1f} | {large_rebuild:.1f} |")


if __name__ == "__main__":
    main()
