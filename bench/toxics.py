"""How close `anubis toxiproxy`'s latency and bandwidth toxics come to what they ask (toxiproxy-python).

    python bench/toxics.py [--rounds 5]

Theory of operation: the tests check the toxics' effects one way only (never faster than asked:
a fault can only add time), because on shared cores an upper bound is a bet on the neighbours.
Toxiproxy's own tests allow 10 %. This starts `anubis toxiproxy` and a blocking echo server,
creates a proxy through the toxiproxy-python client (a test dependency), and measures a
500 ms latency toxic on a round trip and a 200 KB/s bandwidth toxic on 400 KB, `--rounds`
times each, printing the median and its error against the spec. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import toxiproxy
from toxiproxy.api import APIConsumer


def echo_server() -> str:
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.monotonic()
    sock.sendall(payload)
    received = 0
    while received < len(payload):
        received += len(sock.recv(65536))
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "trioanubis", "toxiproxy", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        APIConsumer.host, APIConsumer.port = "127.0.0.1", port
        client = toxiproxy.Toxiproxy()
        while not client.running():
            time.sleep(0.05)
        proxy = client.create(upstream=echo_server(), name="bench")
        host, _, listen = proxy.listen.rpartition(":")
        with socket.create_connection((host, int(listen))) as sock:
            base = min(round_trip(sock, b"ping") for _ in range(5))
            proxy.add_toxic(type="latency", attributes={"latency": 500})
            latency = statistics.median(round_trip(sock, b"ping") - base for _ in range(args.rounds))
            proxy.destroy_toxic("latency_downstream")
            proxy.add_toxic(type="bandwidth", attributes={"rate": 200})
            payload = os.urandom(400_000)
            took = statistics.median(round_trip(sock, payload) for _ in range(args.rounds))
        print(f"latency 500 ms: measured {latency * 1000:.1f} ms ({(latency / 0.5 - 1) * 100:+.1f} %)")
        rate = len(payload) / took / 1000
        print(f"bandwidth 200 KB/s: measured {rate:.1f} KB/s ({(rate / 200 - 1) * 100:+.1f} %)")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
