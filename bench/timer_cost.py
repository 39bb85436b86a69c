"""Micro-benchmark: the Timer's CPU per second of wall time with many idle relays registered.

    python bench/timer_cost.py [--relays 100000] [--seconds 5] [--tick 0.005 ...]

For each tick asked for, registers that many idle relays (relaying, no
traffic, idle_timeout 10 min, half_close_timeout 1 min: the defaults) with
a fresh Timer, lets its task run alone in `trio.run` for `--seconds`, and
prints the process CPU time the run took per second (nothing else runs, so
that is the Timer's). The tick is a twentieth of the shortest timeout of
any pool: 0.15 s with the default connect_timeout of 3 s, the 5 ms floor
when some pool has a timeout of 100 ms or less.
Not a test: figures depend on the machine; compare rows, not absolutes.
"""

from __future__ import annotations

import argparse
import socket
import time

import trio

from trioanubis.proxy.io.portable import PortableReadiness
from trioanubis.proxy.relay import Relay
from trioanubis.proxy.timeouts import Timer


async def cpu_per_second(relays: int, seconds: float, tick: float) -> float:
    client, other = socket.socketpair()
    backend = PortableReadiness()
    timer = Timer(tick)
    now = trio.current_time()
    for _ in range(relays):
        relay = Relay(client, idle_timeout=600.0, half_close_timeout=60.0, poller=backend)
        relay.last_activity = now
        relay.scope = trio.CancelScope()
        timer.watch(relay)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await trio.sleep(1.0)  # registration settles (a first pass over every relay)
        start = time.process_time()
        await trio.sleep(seconds)
        used = time.process_time() - start
        nursery.cancel_scope.cancel()
    client.close()
    other.close()
    return used / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--relays", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tick", type=float, nargs="+", default=[0.15, 0.005])
    args = parser.parse_args()
    print("| relays | tick | Timer CPU per second |")
    print("|---|---|---|")
    for tick in args.tick:
        used = trio.run(cpu_per_second, args.relays, args.seconds, tick)
        print(f"| {args.relays:,} | {tick * 1000:g} ms | {used * 1000:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
