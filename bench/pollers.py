"""Do open dashboards cost the data path? Keep-alive throughput with and without 50 `/stats` pollers.

    python bench/pollers.py [--rounds 3] [--duration 10] [--pollers 50]

Starts the same nginx backends as compare.py and one trioanubis with an admin
endpoint, then runs `wrk -t1 -c50` (keep-alive) through it, alternating runs
without and with N pollers: each poller is one keep-alive HTTP/1.1 connection
asking `GET /stats` once a second, as an open dashboard does (they live in a
separate process, so their own cost is not the balancer's). Prints the median
req/s and the balancer's CPU time per request of each, and their ratios; on a
shared host the CPU per request is the steadier figure. Bounded: rounds × 2 runs of `duration` seconds,
loopback only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import free_port, run_keepalive, start_backends, wait_port

POLLER = """
import asyncio, sys
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
answered = 0
async def poll(reader, writer):
    global answered
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        writer.write(b"GET /stats HTTP/1.1\\r\\nHost: admin\\r\\n\\r\\n")
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
        await reader.readexactly(length)
        answered += 1
        await asyncio.sleep(1.0)
    writer.close()
async def main():
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    print("ready", flush=True)
    await asyncio.gather(*(poll(*stream) for stream in streams))
    print(answered)
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, listen: int, duration: float) -> tuple[float, float]:
    """Keep-alive req/s through the balancer, and its CPU µs per request (less noisy on a shared host)."""
    before = cpu_seconds(pid)
    rate = run_keepalive(listen, duration)
    return rate, (cpu_seconds(pid) - before) / max(1.0, rate * duration) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pollers", type=int, default=50)
    args = parser.parse_args()
    without: list[tuple[float, float]] = []
    with_pollers: list[tuple[float, float]] = []
    with start_backends() as backends, tempfile.TemporaryDirectory(prefix="bench-pollers-") as tmp:
        listen, admin = free_port(), free_port()
        servers = ", ".join(f'"127.0.0.1:{p}"' for p in backends.http)
        config = Path(tmp) / "anubis.toml"
        config.write_text(f"""
[settings]
access_log = false
[admin]
bind = "127.0.0.1:{admin}"
[listeners.bench]
bind = "127.0.0.1:{listen}"
pool = "bench"
[pools.bench]
servers = [{servers}]
""")
        process = subprocess.Popen([sys.executable, "-m", "trioanubis", "--log-level", "warning", "run",
                                    "-c", str(config)])  # fmt: skip
        try:
            wait_port(listen)
            wait_port(admin)
            for round_ in range(args.rounds):
                # A B, then B A: whatever else the host does drifts over both arms alike.
                order = ("without", "with") if round_ % 2 == 0 else ("with", "without")
                answered = 0
                for arm in order:
                    if arm == "without":
                        without.append(measured(process.pid, listen, args.duration))
                        continue
                    argv = [sys.executable, "-c", POLLER, str(admin), str(args.pollers),
                            str(args.duration + 1)]  # fmt: skip
                    pollers = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                    assert pollers.stdout is not None
                    pollers.stdout.readline()  # "ready": all connections open, the first polls start
                    with_pollers.append(measured(process.pid, listen, args.duration))
                    answered = int(pollers.communicate(timeout=args.duration + 60)[0] or 0)
                (a_rate, a_cpu), (b_rate, b_cpu) = without[-1], with_pollers[-1]
                print(f"round {round_ + 1}: without {a_rate:.0f} req/s, {a_cpu:.1f} µs CPU/req; "
                      f"with {args.pollers} pollers {b_rate:.0f} req/s, {b_cpu:.1f} µs CPU/req "
                      f"({answered} /stats answered)", flush=True)  # fmt: skip
        finally:
            process.terminate()
            process.wait(10)
    for index, what in ((0, "req/s"), (1, "balancer CPU µs per request")):
        a = statistics.median(x[index] for x in without)
        b = statistics.median(x[index] for x in with_pollers)
        spread = f"{min(x[index] for x in without):.1f}–{max(x[index] for x in without):.1f} vs " \
                 f"{min(x[index] for x in with_pollers):.1f}–{max(x[index] for x in with_pollers):.1f}"
        print(f"median {what}: {a:.1f} without, {b:.1f} with {args.pollers} pollers "
              f"(ratio {b / a:.3f}; min–max {spread})")


if __name__ == "__main__":
    main()
