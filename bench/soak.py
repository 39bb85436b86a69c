"""Soak run: bounded mixed traffic through a real `anubis` process, one backend restarted often.

    python bench/soak.py [--seconds 60] [--restart-every 5] [--clients 24]

Loopback only. Three echo backends behind the balancer; every `--restart-every`
seconds one of them is killed and started again. Clients run short
request/response exchanges, long-lived connections with periodic exchanges,
and bulk transfers, and check every byte with a digest. A failed connection is
"expected" when a backend was killed while it was open (the balancer cannot
save bytes a dead server never sent), otherwise "unexpected". Ends with one
summary line; exit status 1 on any unexpected error or byte mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Tally:
    connections: int = 0
    bytes: int = 0
    expected_errors: int = 0
    unexpected_errors: int = 0
    mismatches: int = 0
    kills: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def failed(self, started: float, what: str) -> None:
        if any(started <= k <= time.monotonic() for k in self.kills):
            self.expected_errors += 1
        else:
            self.unexpected_errors += 1
            if len(self.examples) < 5:
                self.examples.append(what)


async def exchange(port: int, payload: bytes, tally: Tally, rounds: int = 1, pause: float = 0.0) -> None:
    started = time.monotonic()
    tally.connections += 1
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for _ in range(rounds):
                received = bytearray()

                async def send() -> None:
                    await stream.send_all(payload)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    while len(received) < len(payload):
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                        received += data
                if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
                    if len(received) < len(payload):
                        tally.failed(started, f"short read {len(received)}/{len(payload)}")
                    else:
                        tally.mismatches += 1
                    return
                tally.bytes += 2 * len(payload)
                if pause:
                    await trio.sleep(pause)
            await stream.send_eof()
            if await stream.receive_some(1) != b"":
                tally.mismatches += 1
    except (OSError, trio.BrokenResourceError) as exc:
        tally.failed(started, f"{type(exc).__name__}: {exc}")


async def client(port: int, tally: Tally, deadline: float, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        kind = rng.random()
        if kind < 0.7:
            await exchange(port, rng.randbytes(rng.randint(1, 20_000)), tally)
        elif kind < 0.9:
            await exchange(port, rng.randbytes(rng.randint(1, 2000)), tally, rounds=20, pause=0.25)
        else:
            await exchange(port, rng.randbytes(rng.randint(1, 8) << 20), tally)


async def restarter(ports: list[int], processes: list[subprocess.Popen[bytes]], every: float,
                    deadline: float, tally: Tally) -> None:  # fmt: skip
    index = 0
    while time.monotonic() + every < deadline:
        await trio.sleep(every)
        victim = index % len(ports)
        index += 1
        tally.kills.append(time.monotonic())
        processes[victim].kill()
        processes[victim].wait()
        await trio.sleep(0.5)
        processes[victim] = start_echo(ports[victim])
        tally.kills.append(time.monotonic())


def start_echo(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE / "peers" / "echo_server.py"), str(port)])


async def main(args: argparse.Namespace) -> int:
    ports = [free_port() for _ in range(3)]
    backends = [start_echo(p) for p in ports]
    listen = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.toml"
        servers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
        config.write_text(f"""
[settings]
access_log = false
[listeners.soak]
bind = "127.0.0.1:{listen}"
pool = "soak"
[pools.soak]
servers = [{servers}]
connect_timeout = "1s"
eject_after = 1
[pools.soak.health]
check = "tcp"
interval = "250ms"
rise = 1
fall = 1
""")
        balancer = subprocess.Popen([sys.executable, "-m", "trioanubis", "--log-level", "error", "run",
                                     "-c", str(config)])  # fmt: skip
        try:
            with trio.fail_after(30):
                while True:
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", listen)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.1)
            await trio.sleep(0.5)
            rss_start, fds_start = rss_kib(balancer.pid), fds(balancer.pid)
            tally = Tally()
            deadline = time.monotonic() + args.seconds
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restarter, ports, backends, args.restart_every, deadline, tally)
                for i in range(args.clients):
                    nursery.start_soon(client, listen, tally, deadline, random.Random(i))
            await trio.sleep(1.0)  # let the last connections close in the balancer
            rss_end, fds_end = rss_kib(balancer.pid), fds(balancer.pid)
        finally:
            balancer.terminate()
            balancer.wait(30)
            for backend in backends:
                backend.kill()
                backend.wait()
    print(f"soak {args.seconds:g}s: connections={tally.connections} bytes={tally.bytes} "
          f"client_errors={tally.expected_errors + tally.unexpected_errors} "
          f"(during a backend kill: {tally.expected_errors}, other: {tally.unexpected_errors}) "
          f"byte_mismatches={tally.mismatches} backend_kills={len(tally.kills) // 2} "
          f"balancer_rss_kib={rss_start}->{rss_end} balancer_fds={fds_start}->{fds_end} "
          f"exit={balancer.returncode}")  # fmt: skip
    for example in tally.examples:
        print(f"  unexpected: {example}")
    return 1 if tally.unexpected_errors or tally.mismatches else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--restart-every", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=24)
    raise SystemExit(trio.run(main, parser.parse_args()))
