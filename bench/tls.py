"""TLS benchmark: SNI routing against plain relaying and HAProxy, termination handshakes against HAProxy.

    python bench/tls.py [--duration S] [--rounds N]

Contenders, each started afresh per run, runs interleaved:
- keep-alive over TLS passthrough (h2load --h1, 50 connections, to an nginx TLS backend):
  trioanubis with `routes` (SNI routing), trioanubis plain (no routes: the bytes are relayed
  without reading the ClientHello), HAProxy `req.ssl_sni`;
- new TLS connections/s (h2load --h1, one request per connection): the same three;
- handshakes/s of TLS termination (`openssl s_time -new`, full handshakes, one client):
  trioanubis `tls = {cert, key}` against HAProxy `bind … ssl crt`, both to a plaintext nginx.

Needs nginx, haproxy, h2load, openssl and the cryptography package; prints a Markdown table of
medians (min–max). The machine is usually shared: numbers are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compare import free_port, wait_port
from tests.tlscerts import Authority

Command = Callable[[Path, int, int], list[str]]
# Connections opened at once for "new TLS connections/s" (h2load opens them together, one request each).
NEW_CONNECTIONS = 500


def nginx(tmp: Path, tls_port: int, plain_port: int, cert: str, key: str) -> list[str]:
    config = tmp / "nginx.conf"
    config.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    listen 127.0.0.1:{plain_port} backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{ return 200 "hello\\n"; }}
  }}
}}
""")
    return ["nginx", "-p", str(tmp), "-e", "stderr", "-c", str(config)]


def trioanubis(routes: bool = False, tls: tuple[str, str] | None = None) -> Command:
    def command(tmp: Path, listen: int, backend: int) -> list[str]:
        extra = 'routes = [{ sni = "api.example.com", pool = "bench" }]' if routes else 'pool = "bench"'
        if tls is not None:
            extra += f'\ntls = {{ cert = "{tls[0]}", key = "{tls[1]}" }}'
        config = tmp / "anubis.toml"
        config.write_text(f"""
[settings]
access_log = false
[listeners.bench]
bind = "127.0.0.1:{listen}"
{extra}
[pools.bench]
servers = ["127.0.0.1:{backend}"]
""")
        return [sys.executable, "-m", "trioanubis", "--log-level", "warning", "run", "-c", str(config)]

    return command


def haproxy(mode: str, pem: str = "") -> Command:
    def command(tmp: Path, listen: int, backend: int) -> list[str]:
        if mode == "sni":
            front = f"""  bind 127.0.0.1:{listen}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend bench if {{ req.ssl_sni -i api.example.com }}"""
        else:
            front = f"  bind 127.0.0.1:{listen} ssl crt {pem}"
        config = tmp / "haproxy.cfg"
        config.write_text(f"""
global
  nbthread 1
  maxconn 6000
defaults
  mode tcp
  timeout connect 3s
  timeout client 1m
  timeout server 1m
frontend bench
{front}
backend bench
  server s 127.0.0.1:{backend}
""")
        return ["haproxy", "-db", "-f", str(config)]

    return command


@contextmanager
def running(command: Command, backend: int) -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        port = free_port()
        process = subprocess.Popen(command(Path(tmp), port, backend), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_port(port)
            yield port
        finally:
            process.terminate()
            process.wait(30)


def h2load(port: int, duration: float, new_connections: bool) -> float:
    target = ["--connect-to", f"127.0.0.1:{port}", f"https://api.example.com:{port}/"]
    if new_connections:  # one request per connection: a TCP connect and a TLS handshake each
        argv = ["h2load", "--h1", "-n", str(NEW_CONNECTIONS), "-c", str(NEW_CONNECTIONS), *target]
    else:
        argv = ["h2load", "--h1", "-D", f"{duration:g}", "-c", "50", *target]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=duration * 20 + 60).stdout
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", output)
    if not match:
        raise RuntimeError(f"h2load said: {output[-500:]}")
    return float(match.group(3))


def s_time(port: int, duration: float) -> float:
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", f"{int(duration)}"]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=duration * 4 + 30).stdout
    match = re.search(r"(\d+) connections in (\d+) real seconds", output)
    if not match or not int(match.group(2)):
        raise RuntimeError(f"openssl s_time said: {output[-500:]}")
    return int(match.group(1)) / int(match.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tls-certs-") as certs:
        ca = Authority(Path(certs))
        backend_pair = ca.issue("api.example.com", file="backend")
        front = ca.issue("localhost", "127.0.0.1", file="front")
        pem = Path(certs) / "front.pem"
        pem.write_text(Path(front.cert).read_text() + Path(front.key).read_text())
        tls_port, plain_port = free_port(), free_port()
        with tempfile.TemporaryDirectory(prefix="bench-tls-nginx-") as tmp:
            argv = nginx(Path(tmp), tls_port, plain_port, backend_pair.cert, backend_pair.key)
            backend = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(tls_port)
                results = run(args, tls_port, plain_port, (front.cert, front.key), str(pem))
            finally:
                backend.terminate()
                backend.wait(30)
    for line in results:
        print(line)


def run(args: argparse.Namespace, tls_port: int, plain_port: int, front: tuple[str, str],
        pem: str) -> list[str]:  # fmt: skip
    passthrough = {"trioanubis sni": trioanubis(routes=True), "trioanubis plain": trioanubis(),
                   "haproxy req.ssl_sni": haproxy("sni")}  # fmt: skip
    terminating = {"trioanubis tls": trioanubis(tls=front), "haproxy ssl crt": haproxy("crt", pem)}
    values: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, command in passthrough.items():
            for workload, fresh in (("keep-alive (req/s)", False), ("new TLS connections/s", True)):
                with running(command, tls_port) as port:
                    values.setdefault((workload, name), []).append(h2load(port, args.duration, fresh))
        for name, command in terminating.items():
            with running(command, plain_port) as port:
                values.setdefault(("termination handshakes/s", name), []).append(s_time(port, args.duration))
    lines = ["| workload | contender | median (min–max) |", "|---|---|---|"]
    for (workload, name), samples in values.items():
        lines.append(f"| {workload} | {name} | {statistics.median(samples):,.0f} "
                     f"({min(samples):,.0f}–{max(samples):,.0f}) |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
