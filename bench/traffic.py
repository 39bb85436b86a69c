"""Traffic shaping, measured: bandwidth limits (their pace) and mirroring (what it costs the primary).

    python bench/traffic.py [--rounds N] [--only rates,mirror,sampling]

What issue 31 asks, as measurements (the tests check behaviour only):

- rates: 4 MiB through `download_rate = "1MB/s"` (4 s ± 10% wanted); one client's two connections
  sharing `download_rate_per_client = "1MB/s"` against one alone (twice as long wanted), while a
  connection of another client (127.0.0.2) runs beside them (as long as one alone wanted);
- mirror: the primary's throughput through the balancer with no mirror, a healthy mirror, a
  stopped mirror (nothing listens) and a mirror that never reads (≥ 0.9× of no mirror wanted):
  redis-benchmark (SET and GET, 50 clients) to a real redis-server, and a bulk upload of 256 MiB
  to a discard server;
- sampling: of 2,000 connections with `mirror_percent = 10`, how many the mirror saw (10% ± 3%).

Every trioanubis runs in a process of its own (`python -m trioanubis run`), started afresh per run;
the backends are threads of this process (and redis-server). Prints Markdown tables; the machine is
usually shared, so each figure is a median of `--rounds` runs with min–max, and `uptime` is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compare import free_port, wait_port

MIB = 1 << 20


# ------------------------------------------------------------------ backends (threads)


class Server:
    """A TCP server on 127.0.0.1 whose connections `handle` serves, one thread each; counts accepts."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.handle = handle
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        self.listener.close()


def source(size: int) -> Callable[[socket.socket], None]:
    """Sends `size` bytes at once, then closes."""
    block = os.urandom(MIB)

    def handle(conn: socket.socket) -> None:
        left = size
        while left:
            left -= conn.send(block[: min(left, len(block))])
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    return handle


def discard(conn: socket.socket) -> None:
    """Reads everything and throws it away; closes on EOF."""
    while conn.recv(1 << 18):
        pass


def never_reads(conn: socket.socket) -> None:
    """Accepts and then reads nothing, until the client goes."""
    time.sleep(3600)


def echo_once(conn: socket.socket) -> None:
    """Echoes until EOF."""
    while data := conn.recv(65536):
        conn.sendall(data)


# ------------------------------------------------------------------ the balancer


@contextmanager
def anubis(pool: str, extra_pools: str = "", *, servers: list[int]) -> Iterator[int]:
    """A trioanubis process with one listener on a free port to pool `p` (extra keys in `pool`, more
    tables in `extra_pools`)."""
    port = free_port()
    listed = ", ".join(f'"127.0.0.1:{p}"' for p in servers)
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as tmp:
        config = Path(tmp) / "anubis.toml"
        config.write_text(f"""
[settings]
access_log = false
[listeners.l]
bind = "127.0.0.1:{port}"
pool = "p"
[pools.p]
servers = [{listed}]
{pool}
[pools.p.health]
check = "none"
{extra_pools}
""")
        log = open(Path(tmp) / "stderr.log", "w+b")  # noqa: SIM115 - closed below
        process = subprocess.Popen([sys.executable, "-m", "trioanubis", "--log-level", "warning", "run",
                                    "-c", str(config)], stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        try:
            try:
                wait_port(port)
            except RuntimeError:
                log.seek(0)
                raise RuntimeError(f"trioanubis did not start: {log.read()[-2000:]!r}") from None
            yield port
        finally:
            process.terminate()
            process.wait(10)
            log.seek(0)
            errors = [line for line in log.read().decode(errors="replace").splitlines()
                      if "Traceback" in line]  # fmt: skip
            log.close()
            if errors:
                print(f"    note: the balancer logged {len(errors)} tracebacks", file=sys.stderr)


def download(port: int, source_ip: str = "127.0.0.1") -> tuple[float, int]:
    """Connect (from `source_ip`), read to EOF: (seconds, bytes)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), source_address=(source_ip, 0)) as conn:
        received = 0
        while data := conn.recv(1 << 18):
            received += len(data)
    return time.monotonic() - started, received


def parallel(*calls: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


# ------------------------------------------------------------------ rates


def bench_rates(rounds: int) -> list[str]:
    size = 4 * MIB
    backend = Server(source(size))
    alone, two, other, pace = [], [], [], []
    for _ in range(rounds):
        with anubis('download_rate = "1MB/s"', servers=[backend.port]) as port:
            seconds, received = download(port)
            assert received == size, received
            pace.append(seconds)
        with anubis('download_rate_per_client = "1MB/s"', servers=[backend.port]) as port:
            alone.append(download(port)[0])
            time.sleep(1.0)  # the client's bucket full again, as it was for the first
            both = parallel(lambda: download(port), lambda: download(port),
                            lambda: download(port, "127.0.0.2"))  # fmt: skip
            two.append(max(both[0][0], both[1][0]))  # type: ignore[index]
            other.append(both[2][0])  # type: ignore[index]
    backend.close()
    return [
        "| bandwidth limit | seconds, median (min–max) | wanted |", "|---|---|---|",
        f"| 4 MiB at download_rate = 1MB/s | {spread(pace)} | 4 ± 0.4 (3.69 computed: 0.5 MB burst, then "
        "1 MB/s) |",
        f"| 4 MiB, one connection, download_rate_per_client = 1MB/s | {spread(alone)} | – |",
        f"| 2 × 4 MiB, two connections of one client beside it | {spread(two)} | twice the above: "
        f"{statistics.median(two) / statistics.median(alone):.2f}× measured |",
        f"| 4 MiB, a connection of another client meanwhile | {spread(other)} | as one alone: "
        f"{statistics.median(other) / statistics.median(alone):.2f}× measured |",
    ]  # fmt: skip


# ------------------------------------------------------------------ mirror


@contextmanager
def redis(port: int) -> Iterator[None]:
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--daemonize", "no"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield
    finally:
        process.terminate()
        process.wait(10)


def redis_ops(port: int) -> float:
    """SET and GET requests per second through `port` (redis-benchmark, 50 clients), their mean."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", "100000", "-t", "set,get",
                          "-q"], capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    rates = [float(m) for m in re.findall(r"([\d.]+) requests per second", out)]
    return statistics.mean(rates) if rates else 0.0


def upload(port: int, size: int = 256 * MIB) -> float:
    """MB/s of a bulk upload of `size` bytes through `port` to the discard server (until its close)."""
    block = os.urandom(MIB)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(size // MIB):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    return size / (time.monotonic() - started) / 1e6


MIRRORS = ("no mirror", "healthy mirror", "stopped mirror, address", "stopped mirror, pool",
           "mirror never reads")  # fmt: skip


def mirror_keys(how: str, healthy: int, dead: int, stuck: int) -> tuple[str, str]:
    """The mirroring pool's keys and the mirror pool's table for one case (a pool is health-checked)."""
    if how == "no mirror":
        return "", ""
    if how.endswith(", pool"):
        shadow = f'[pools.shadow]\nservers = ["127.0.0.1:{dead}"]\n[pools.shadow.health]\ncheck = "tcp"\n'
        return 'mirror = "shadow"', shadow
    target = {"healthy mirror": healthy, "stopped mirror, address": dead, "mirror never reads": stuck}[how]
    return f'mirror = "127.0.0.1:{target}"', ""


def bench_mirror(rounds: int) -> list[str]:
    stuck = Server(never_reads)
    sink, sink_mirror = Server(discard), Server(discard)
    dead = free_port()
    ops: dict[str, list[float]] = {how: [] for how in MIRRORS}
    bulk: dict[str, list[float]] = {how: [] for how in MIRRORS}
    primary, shadow = free_port(), free_port()
    with redis(primary), redis(shadow):
        for _ in range(rounds):
            for how in MIRRORS:  # interleaved: A B C D A B C D ...
                keys = mirror_keys(how, shadow, dead, stuck.port)
                with anubis(*keys, servers=[primary]) as port:
                    ops[how].append(redis_ops(port))
                keys = mirror_keys(how, sink_mirror.port, dead, stuck.port)
                with anubis(*keys, servers=[sink.port]) as port:
                    bulk[how].append(upload(port))
    lines = ["| primary's throughput | redis SET+GET, req/s | ÷ no mirror | bulk upload, MB/s "
             "| ÷ no mirror |", "|---|---|---|---|---|"]  # fmt: skip
    for how in MIRRORS:
        lines.append(f"| {how} | {spread(ops[how], 0)} | {ratio(ops, how)} | {spread(bulk[how], 0)} | "
                     f"{ratio(bulk, how)} |")  # fmt: skip
    return lines


def ratio(figures: dict[str, list[float]], how: str) -> str:
    base = statistics.median(figures["no mirror"])
    return f"{statistics.median(figures[how]) / base:.2f}×" if base else "–"


# ------------------------------------------------------------------ sampling


def bench_sampling(connections: int = 2000) -> list[str]:
    echo, mirror = Server(echo_once), Server(discard)
    with anubis(f'mirror = "127.0.0.1:{mirror.port}"\nmirror_percent = 10', servers=[echo.port]) as port:
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(b"ping")
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(64):
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and mirror.accepted < connections * 0.07:
            time.sleep(0.1)
        time.sleep(2.5)  # the last copies' linger
    share = mirror.accepted / connections * 100
    return ["| mirror_percent = 10 | connections | mirrored | share | wanted |", "|---|---|---|---|---|",
            f"| | {connections} | {mirror.accepted} | {share:.1f}% | 10% ± 3% |"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="rates,mirror,sampling")
    args = parser.parse_args()
    chosen = args.only.split(",")
    if "mirror" in chosen and not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        sys.exit("bench: redis-server and redis-benchmark are needed "
                 "(apt-get install redis-server redis-tools)")
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    report: list[str] = []
    if "rates" in chosen:
        report += [*bench_rates(args.rounds), ""]
    if "mirror" in chosen:
        report += [*bench_mirror(args.rounds), ""]
    if "sampling" in chosen:
        report += bench_sampling()
    print("\n".join(report))
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
