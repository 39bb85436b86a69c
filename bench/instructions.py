"""Instructions per connection and per request, counted by callgrind: figures the machine's noise spares.

    python bench/instructions.py [--source DIR] [--io auto|epoll|portable] [-n 400] [--requests 2000]
                                 [--concurrency 1] [--server-closes]

Theory of operation: on shared cores, rates move by ±15 % from run to run and
CPU time per unit by several per cent; two trees that differ by 3 % cannot be
told apart that way. Valgrind's callgrind counts the instructions a process
executes, the same for the same program and inputs whatever else runs (the
tool library's machine notes: "the same total twice, once with the other core
loaded"), given the same scheduling: Trio's random choice of task order is
seeded here, and so is Python's string hashing. So this runs the balancer
(this tree, or `--source DIR`'s) under
callgrind three times, each behind the same echo backend (in this process)
and driven the same way: start and stop only (the baseline); `-n` new
connections, one after another, each sending 100 bytes, reading them back and
closing (the connection-rate workload's unit), `--concurrency` of them at a
time (1: the balancer wakes up for every connection, nothing is batched; 50,
as wrk's: under valgrind the balancer is then always behind, as it is when
saturated, and each wake-up finds many events; the thread scheduling varies,
so this count moves by a per cent or two between runs); `--requests`
exchanges of 100 bytes (keep-alive's unit) over one connection, or spread
over `--concurrency` connections open at once (wrk's -c50: then each of the
balancer's wake-ups finds several requests). It prints the
instructions per connection and per request, each run's minus the baseline.
The balancer's own instructions only: the backend and the clients run here.

Slow: a run of a few hundred connections takes a minute or two under valgrind.
Nothing here asserts anything; it is a measuring tool for bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAYLOAD = b"x" * 100


def echo_server(answer_once: bool = False) -> tuple[int, threading.Event]:
    """A thread echoing every connection (blocking sockets: this process is not measured).

    `answer_once`: echo the first read and close at once, as an HTTP server does
    with `Connection: close` (the server's FIN comes first, the client's after it
    read the answer: the connection-rate workload's order); otherwise echo until
    the client's EOF (the client's FIN comes first).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
                if answer_once:
                    return

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
        listener.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange(sock: socket.socket) -> None:
    sock.sendall(PAYLOAD)
    got = b""
    while len(got) < len(PAYLOAD):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the balancer closed early")
        got += data


def measure(args: argparse.Namespace, backend: int, drive: str) -> int:
    """The balancer's instructions for one run: start, `drive`, SIGTERM, exit."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "anubis.toml"
        config.write_text(f'[settings]\naccess_log = false\nio = "{args.io}"\n'
                          f'[listeners.bench]\nbind = "127.0.0.1:{port}"\npool = "bench"\n'
                          f'[pools.bench]\nservers = ["127.0.0.1:{backend}"]\n'
                          'health = { check = "none" }\n')
        out = Path(tmp) / "callgrind.out"
        # Trio reverses a batch of runnable tasks at random: seeded, two runs schedule alike.
        path = f"sys.path.insert(0, {args.source!r}); " if args.source else ""
        start = ["-c", f"import sys, runpy; {path}import trio._core._run as run; run._r.seed(0); "
                       "runpy.run_module('trioanubis', run_name='__main__')"]  # fmt: skip
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
                   sys.executable, *start, "--log-level", "warning", "run", "-c", str(config)]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port)
        if drive == "connrate":
            connect_many(port, args.n, args.concurrency)
        elif drive == "keepalive":
            keep_alive_many(port, args.requests, args.concurrency)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=600)
        match = re.search(rb"Collected : (\d+)", err) or re.search(rb"summary: (\d+)", out.read_bytes())
        if match is None:
            raise RuntimeError(f"no instruction count in callgrind's output: {err[-500:]!r}")
        if args.keep:  # for callgrind_annotate: where the instructions go, by C function
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            out.replace(Path(args.keep) / f"callgrind.{drive}")
        return int(match.group(1))


def connect_many(port: int, count: int, concurrency: int) -> None:
    """`count` connections, each an exchange, from `concurrency` threads at once."""

    def client(share: int) -> None:
        for _ in range(share):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                exchange(sock)

    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def keep_alive_many(port: int, requests: int, concurrency: int) -> None:
    """`requests` exchanges over `concurrency` connections at once, each kept open for its share."""

    def client(share: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(share):
                exchange(sock)

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(share,)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_port(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="", help="a source tree to measure instead of this one")
    parser.add_argument("--io", default="auto", choices=("auto", "epoll", "portable"))
    parser.add_argument("-n", type=int, default=400, help="connections in the connection-rate run")
    parser.add_argument("--requests", type=int, default=2000, help="exchanges in the keep-alive run")
    parser.add_argument("--concurrency", type=int, default=1, help="connections at a time (both runs)")
    parser.add_argument("--keep", default="", metavar="DIR", help="keep callgrind's output files in DIR")
    parser.add_argument("--no-keepalive", action="store_true", help="skip the keep-alive run")
    parser.add_argument("--server-closes", action="store_true",
                        help="the backend answers once and closes first, as nginx does for wrk's "
                             "Connection: close (implies --no-keepalive)")  # fmt: skip
    args = parser.parse_args()
    args.no_keepalive = args.no_keepalive or args.server_closes
    backend, stop = echo_server(args.server_closes)
    try:
        base = measure(args, backend, "none")
        connrate = measure(args, backend, "connrate")
        keepalive = 0 if args.no_keepalive else measure(args, backend, "keepalive")
    finally:
        stop.set()
    tree = args.source or str(Path(__file__).resolve().parent.parent)
    print(f"{tree} (io {args.io}): baseline {base:,} instructions")
    closes = "; the server closes first" if args.server_closes else ""
    print(f"  per connection ({args.concurrency} at a time{closes}): {(connrate - base) / args.n:,.0f}")
    if keepalive:
        at_once = f" ({args.concurrency} connections at a time)" if args.concurrency > 1 else ""
        print(f"  per keep-alive request{at_once}: {(keepalive - base) / args.requests:,.0f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict orders run to run
    sys.exit(main())
