"""Side-by-side benchmark: trioanubis against HAProxy, nginx stream and Python peers.

    python bench/compare.py [--quick] [--rounds N] [--duration S] [--only NAME,...] [--profile] [--save]

Every contender relays to the same loopback backends; runs are interleaved
(A B C A B C …) and each run starts the contender afresh and measures once
it is idle (its workers started). Prints a Markdown table of medians with
min–max, and ratios against HAProxy and against the best Python peer.
`--save` also writes bench/results/<date>.md with the machine's
description. `--profile` also reads each contender's CPU time (user and
system, its worker processes included) before and after every keepalive
and connrate run, and prints the CPU per request and per connection: on
shared cores, work per unit is steadier than work per second. It never
installs anything: see bench/README.md; a missing contender or tool is
skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
IDLE_CONNECTIONS = 5000
PYTHON_PEERS = ("pproxy", "asyncio", "asyncio+uvloop")
WORKLOADS = ("keepalive", "connrate", "bulk", "latency", "memory")
UNITS = {"keepalive": "req/s", "connrate": "conn/s", "bulk": "Gb/s", "latency": "ms added p50 / p99",
         "memory": "KiB per idle connection"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# Workloads `--profile` measures the CPU of, and the unit of work of each.
PROFILED = {"keepalive": "request", "connrate": "connection"}
CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid`, its threads and descendants (Linux /proc).

    A process's stat counts all its threads, and its children once they are
    waited for (cutime, cstime); children still running are read themselves.
    """
    user = system = 0.0
    with suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user = (int(fields[11]) + int(fields[13])) / CLOCK_TICK
        system = (int(fields[12]) + int(fields[14])) / CLOCK_TICK
    for child in children(pid):
        child_user, child_system = cpu_times(child)
        user, system = user + child_user, system + child_system
    return user, system


def settle(pid: int, window: float = 0.2, quiet: float = 0.01, limit: float = 10.0) -> None:
    """Wait until `pid` and its children are idle: the port may accept before every worker started.

    A supervisor that binds the listening socket itself accepts (into the
    backlog) while its workers still import; without this, a run would
    count their start-up as work per request and lose its first fraction
    of a second. Nothing is measured until `window` passes with at most
    `quiet` CPU seconds used (at most `limit` seconds of waiting).
    """
    deadline = time.monotonic() + limit
    before = sum(cpu_times(pid))
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(cpu_times(pid))
        if now - before <= quiet:
            return
        before = now


@contextmanager
def cpu_used(pid: int) -> Iterator[list[float]]:
    """Yields a list that holds, once the block ends, the user and system CPU seconds used during it."""
    used: list[float] = []
    before = cpu_times(pid)
    yield used
    after = cpu_times(pid)
    used += [after[0] - before[0], after[1] - before[1]]


@dataclass
class Backends:
    http: list[int]
    proxied: list[int]  # the same nginx servers, on ports that expect a PROXY protocol header
    bulk: int
    idle: int
    mirror: int  # a discard server (peers/hold_server.py) that trioanubis+mirror copies to


@dataclass
class Contender:
    name: str
    command: Callable[[Path, int, list[int]], list[str]]  # (tmpdir, listen, backends) → argv
    needs: list[str]
    workloads: tuple[str, ...] = WORKLOADS
    env: dict[str, str] = field(default_factory=dict)
    proxied: bool = False  # sends a PROXY header: its HTTP workloads use the backends' proxied ports

    def missing(self) -> str:
        for tool in self.needs:
            if not (shutil.which(tool) or Path(tool).exists()):
                return tool
        return ""


# ----------------------------------------------------------------- contenders


def trioanubis(
    access_log: bool, send_proxy: str = "none", io: str = "auto", workers: int = 1, source: str = "",
    shaping: str = "",
) -> Callable[[Path, int, list[int]], list[str]]:
    """`shaping`: "mirror" copies every connection to a discard server (`Backends.mirror`); "rate"
    sets a bandwidth limit that never binds (1024 GiB/s each way), so what it measures is what a
    limited connection costs."""

    def command(tmp: Path, listen: int, backends: list[int]) -> list[str]:
        servers = ", ".join(f'"127.0.0.1:{p}"' for p in backends)
        config = tmp / "anubis.toml"
        config.write_text(f"""
[settings]
access_log = {str(access_log).lower()}
io = "{io}"
workers = {workers}
[listeners.bench]
bind = "127.0.0.1:{listen}"
pool = "bench"
[pools.bench]
servers = [{servers}]
send_proxy = "{send_proxy}"
{SHAPING[shaping]()}
""")
        level = "info" if access_log else "warning"
        return [*python_running(source), "--log-level", level, "run", "-c", str(config)]

    return command


SHAPING: dict[str, Callable[[], str]] = {
    "": lambda: "",
    "mirror": lambda: f'mirror = "127.0.0.1:{_MIRROR_PORT}"',
    "rate": lambda: 'upload_rate = "1024GiB/s"\ndownload_rate = "1024GiB/s"',
}


def python_running(source: str) -> list[str]:
    """How to start `python -m trioanubis`: this tree's, or the one in `source` (`--baseline`)."""
    if not source:
        return [sys.executable, "-m", "trioanubis"]
    start = (f"import sys, runpy; sys.path.insert(0, {source!r}); "
             "runpy.run_module('trioanubis', run_name='__main__')")
    return [sys.executable, "-c", start]


def haproxy(splice: bool, threads: int = 1) -> Callable[[Path, int, list[int]], list[str]]:
    def command(tmp: Path, listen: int, backends: list[int]) -> list[str]:
        servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
        config = tmp / "haproxy.cfg"
        config.write_text(f"""
global
  nbthread {threads}
  maxconn 6000
defaults
  mode tcp
  timeout connect 3s
  timeout client 10m
  timeout server 10m
  {"option splice-auto" if splice else ""}
frontend bench
  bind 127.0.0.1:{listen}
  default_backend bench
backend bench
  balance roundrobin
{servers}
""")
        return ["haproxy", "-db", "-f", str(config)]

    return command


def nginx_stream(tmp: Path, listen: int, backends: list[int]) -> list[str]:
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in backends)
    config = tmp / "nginx.conf"
    config.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr crit;
worker_rlimit_nofile 19000;
events {{ worker_connections 19000; }}
stream {{
  upstream bench {{
{servers}
  }}
  server {{ listen 127.0.0.1:{listen} backlog=4096; proxy_pass bench; }}
}}
""")
    return ["nginx", "-p", str(tmp), "-e", "stderr", "-c", str(config)]


def pproxy_command(executable: str) -> Callable[[Path, int, list[int]], list[str]]:
    def command(tmp: Path, listen: int, backends: list[int]) -> list[str]:
        return [executable, "-l", f"tunnel{{127.0.0.1:{backends[0]}}}://127.0.0.1:{listen}"]

    return command


def asyncio_relay(python: str, uvloop: bool) -> Callable[[Path, int, list[int]], list[str]]:
    def command(tmp: Path, listen: int, backends: list[int]) -> list[str]:
        flag = ["--uvloop"] if uvloop else []
        return [python, str(PEERS / "asyncio_relay.py"), *flag, str(listen), *map(str, backends)]

    return command


def tree_named(source: str) -> str:
    """Which tree a contender runs, and which build: compiled (setup.py's extensions beside the
    sources, .ci/compiled-tree) or pure Python."""
    tree = Path(source) if source else HERE.parent
    compiled = any((tree / "trioanubis" / "proxy").glob("relay.*.so"))
    return f"{source or 'this tree'} ({'compiled' if compiled else 'pure Python'})"


def contenders(args: argparse.Namespace) -> list[Contender]:
    ours = our_contenders(args.source)
    if args.baseline:  # the same contenders from another tree, interleaved with these
        ours += [replace(c, name=f"{c.name}@base") for c in our_contenders(args.baseline)]
    return [*ours, *others(args)]


def our_contenders(source: str) -> list[Contender]:
    # The tree on every process's path, workers' too: a worker process of a tree older than
    # `workers/slot.py`'s `worker_command` imports whatever its path finds first (this tree's
    # pure modules when started from here), not the compiled modules of `source`.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [source or str(HERE.parent),
                                                        os.environ.get("PYTHONPATH", "")]))}
    contenders = [
        Contender("trioanubis", trioanubis(False, source=source), []),
        Contender("trioanubis+log", trioanubis(True, source=source), [], ("keepalive", "connrate")),
        Contender("trioanubis+send_proxy", trioanubis(False, "v2", source=source), [],
                  ("keepalive", "connrate"), proxied=True),
        # The readiness backend of macOS, BSD and Windows (Trio's waits, copying), run on Linux.
        Contender("trioanubis-portable", trioanubis(False, io="portable", source=source), []),
        # Every core: 2 worker processes against 2 HAProxy threads (keep-alive, connection rate).
        Contender("trioanubis-w2", trioanubis(False, workers=2, source=source), [],
                  ("keepalive", "connrate")),
        # Traffic shaping (issue 31): every connection mirrored to a discard server; a bandwidth
        # limit that never binds. Their cost against plain trioanubis is the third ratio table.
        Contender("trioanubis+mirror", trioanubis(False, source=source, shaping="mirror"), []),
        Contender("trioanubis+rate", trioanubis(False, source=source, shaping="rate"), [],
                  ("keepalive", "connrate", "bulk")),
    ]
    return [replace(contender, env={**contender.env, **env}) for contender in contenders]


def others(args: argparse.Namespace) -> list[Contender]:
    return [
        Contender("haproxy", haproxy(False), ["haproxy"]),
        Contender("haproxy+splice", haproxy(True), ["haproxy"], ("bulk",)),
        Contender("haproxy-t2", haproxy(False, threads=2), ["haproxy"], ("keepalive", "connrate")),
        Contender("nginx-stream", nginx_stream, ["nginx", "/usr/lib/nginx/modules/ngx_stream_module.so"]),
        Contender("pproxy", pproxy_command(args.pproxy), [args.pproxy]),
        Contender("asyncio", asyncio_relay(sys.executable, False), []),
        Contender("asyncio+uvloop", asyncio_relay(args.uvloop_python, True), [args.uvloop_python]),
    ]


@contextmanager
def running(contender: Contender, backends: list[int]) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"bench-{contender.name}-") as tmp:
        argv = [*PIN_CONTENDER, *contender.command(Path(tmp), port, backends)]
        log = open(Path(tmp) / "stderr.log", "w+b")  # noqa: SIM115 - closed below
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp,
                                   env={**os.environ, **contender.env})  # fmt: skip
        try:
            try:
                wait_port(port)
            except RuntimeError:
                log.seek(0)
                raise RuntimeError(f"{contender.name} did not start: {log.read()[-2000:]!r}") from None
            settle(process.pid)
            yield port, process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


# ------------------------------------------------------------------ backends


@contextmanager
def start_backends() -> Iterator[Backends]:
    processes = []
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        http = [free_port(), free_port()]
        proxied = [free_port(), free_port()]
        for i, (port, proxied_port) in enumerate(zip(http, proxied, strict=True)):
            config = Path(tmp) / f"backend{i}.conf"
            config.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/backend{i}.pid;
error_log stderr crit;
worker_rlimit_nofile 19000;
events {{ worker_connections 19000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {tmp}/body{i};
  proxy_temp_path {tmp}/proxy{i};
  fastcgi_temp_path {tmp}/fcgi{i};
  uwsgi_temp_path {tmp}/uwsgi{i};
  scgi_temp_path {tmp}/scgi{i};
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{proxied_port} backlog=4096 proxy_protocol;
    location / {{ return 200 "hello from backend {i}\\n"; }}
  }}
}}
""")
            nginx = [*PIN_BACKENDS, "nginx", "-p", tmp, "-e", "stderr", "-c", str(config)]
            processes.append(subprocess.Popen(nginx,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        bulk = free_port()
        iperf = [*PIN_BACKENDS, "iperf3", "-s", "-p", str(bulk)]
        processes.append(subprocess.Popen(iperf, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip
        idle, mirror = free_port(), free_port()
        for port in (idle, mirror):
            hold = [*PIN_BACKENDS, sys.executable, str(PEERS / "hold_server.py"), str(port)]
            processes.append(subprocess.Popen(hold))
        try:
            for port in [*http, *proxied, bulk, idle, mirror]:
                wait_port(port)
            yield Backends(http, proxied, bulk, idle, mirror)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)


# ----------------------------------------------------------------- workloads


# `--pin-load CPUS`: the load generator runs under `taskset -c CPUS` (empty: anywhere).
PIN_LOAD: list[str] = []
# `--pin C:L`: the contender runs under `taskset -c C`, the backends and the load generator
# under `taskset -c L` (PIN_LOAD), so that the contender has its CPU to itself.
PIN_CONTENDER: list[str] = []
PIN_BACKENDS: list[str] = []


# wrk's connections open at once in the keep-alive and connection-rate workloads (`--connections`).
WRK_CONNECTIONS: list[int] = [50]


def wrk(port: int, duration: float, *extra: str) -> str:
    command = [*PIN_LOAD, "wrk", "-t1", f"-c{WRK_CONNECTIONS[0]}", f"-d{duration:g}s", *extra,
               f"http://127.0.0.1:{port}/"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout


def requests_per_second(output: str) -> float:
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    if errors:
        print(f"    note: wrk reported {errors.group(0).strip()}", file=sys.stderr)
    return float(match.group(1)) if match else 0.0


def latency_ms(output: str, percentile: str) -> float:
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_keepalive(port: int, duration: float) -> float:
    return requests_per_second(wrk(port, duration))


def run_connrate(port: int, duration: float) -> float:
    return requests_per_second(wrk(port, duration, "-H", "Connection: close"))


def run_latency(port: int, duration: float) -> tuple[float, float]:
    output = subprocess.run([*PIN_LOAD, "wrk", "-t1", "-c10", f"-d{duration:g}s", "--latency",
                             f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                            timeout=duration + 60).stdout  # fmt: skip
    return latency_ms(output, "50"), latency_ms(output, "99")


def run_bulk(port: int, duration: float) -> float:
    """Gb/s of one iperf3 stream; retried when the iperf3 server is still busy with the last test."""
    for _ in range(3):
        result = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{duration:g}",
                                 "-J"], capture_output=True, text=True, timeout=duration + 60)  # fmt: skip
        try:
            return float(json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
        except (ValueError, KeyError):
            time.sleep(1.0)
    print("    note: iperf3 failed three times; recorded 0", file=sys.stderr)
    return 0.0


def run_memory(port: int, process: subprocess.Popen[bytes]) -> float:
    """RSS growth of the contender per idle connection, in KiB."""
    pids = [process.pid, *children(process.pid)]
    time.sleep(0.5)
    before = rss_kib(pids)
    sockets = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sockets.append(s)
        deadline = time.monotonic() + 60
        while established_to_idle_backend() < IDLE_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        after = rss_kib([process.pid, *children(process.pid)])
    finally:
        for s in sockets:
            s.close()
    return (after - before) / IDLE_CONNECTIONS


_IDLE_PORT = 0
_MIRROR_PORT = 0  # where trioanubis+mirror copies to (set once the backends run)


def established_to_idle_backend() -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{_IDLE_PORT} )"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return len(out.splitlines())


# ------------------------------------------------------------------- driver


@dataclass
class Results:
    values: dict[tuple[str, str], list[object]] = field(default_factory=dict)

    def add(self, workload: str, contender: str, value: object) -> None:
        self.values.setdefault((workload, contender), []).append(value)


def run_all(args: argparse.Namespace) -> tuple[Results, list[str]]:
    global _IDLE_PORT, _MIRROR_PORT
    results = Results()
    chosen = [c for c in contenders(args) if not args.only or c.name in args.only.split(",")]
    skipped = []
    for contender in chosen:
        if missing := contender.missing():
            skipped.append(f"{contender.name}: {missing} is not installed (see bench/README.md)")
    active = [c for c in chosen if not c.missing()]
    for tool in ("wrk", "iperf3", "nginx", "ss"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed; see bench/README.md")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    workloads = [w for w in WORKLOADS if not args.workloads or w in args.workloads.split(",")]
    with start_backends() as backends:
        _IDLE_PORT = backends.idle
        _MIRROR_PORT = backends.mirror
        for round_number in range(1, args.rounds + 1):
            if "latency" in workloads:
                results.add("latency", "direct", run_latency(backends.http[0], args.duration))
            for workload in workloads:
                for contender in active:
                    if workload not in contender.workloads:
                        continue
                    http = backends.proxied if contender.proxied else backends.http
                    target = {"bulk": [backends.bulk], "memory": [backends.idle]}.get(workload, http)
                    with running(contender, target) as (port, process), cpu_used(process.pid) as cpu:
                        value: object
                        if workload == "keepalive":
                            value = run_keepalive(port, args.duration)
                        elif workload == "connrate":
                            value = run_connrate(port, args.duration)
                        elif workload == "bulk":
                            value = run_bulk(port, args.duration)
                        elif workload == "latency":
                            value = run_latency(port, args.duration)
                        else:
                            value = run_memory(port, process)
                    results.add(workload, contender.name, value)
                    if args.profile and workload in PROFILED:
                        assert isinstance(value, float)
                        units = max(1.0, value * args.duration)  # wrk's rate × its duration
                        per_unit = (cpu[0] / units * 1e6, cpu[1] / units * 1e6)
                        results.add(f"{workload} cpu", contender.name, per_unit)
                    print(f"  round {round_number} {workload:9} {contender.name:15} {fmt_value(value)}",
                          file=sys.stderr, flush=True)  # fmt: skip
    return results, skipped


def fmt_value(value: object) -> str:
    if isinstance(value, tuple):
        return "/".join(f"{v:.3f}" for v in value)
    assert isinstance(value, float)
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def summarise(values: list[float]) -> str:
    median = statistics.median(values)
    digits = 2 if median < 100 else 0
    return f"{median:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def table(results: Results) -> str:
    names = sorted({c for (_, c) in results.values}, key=lambda n: (n != "trioanubis", n))
    lines = ["| contender | " + " | ".join(f"{w} ({UNITS[w]})" for w in WORKLOADS) + " |",
             "|---|" + "---|" * len(WORKLOADS)]  # fmt: skip
    direct = results.values.get(("latency", "direct"), [])
    for name in names:
        cells = []
        for workload in WORKLOADS:
            values = results.values.get((workload, name))
            if not values:
                cells.append("–")
            elif workload == "latency":
                if name == "direct":
                    p50 = statistics.median(v[0] for v in values)  # type: ignore[index]
                    p99 = statistics.median(v[1] for v in values)  # type: ignore[index]
                    cells.append(f"p50 {p50:.3f} / p99 {p99:.3f} ms (baseline)")
                else:
                    cells.append(added_latency(values, direct))  # type: ignore[arg-type]
            else:
                cells.append(summarise(values))  # type: ignore[arg-type]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def added_latency(values: list[tuple[float, float]], direct: list[tuple[float, float]]) -> str:
    base50 = statistics.median(v[0] for v in direct) if direct else 0.0
    base99 = statistics.median(v[1] for v in direct) if direct else 0.0
    p50 = statistics.median(v[0] for v in values) - base50
    p99 = statistics.median(v[1] for v in values) - base99
    return f"+{p50:.3f} / +{p99:.3f}"


def medians(results: Results, workload: str) -> dict[str, float]:
    out = {}
    for (w, name), values in results.values.items():
        if w != workload or name == "direct":
            continue
        if workload == "latency":
            direct = results.values.get(("latency", "direct"), [(0.0, 0.0)])
            out[name] = statistics.median(v[1] for v in values) - statistics.median(  # type: ignore[index]
                v[1] for v in direct  # type: ignore[index]
            )
        else:
            out[name] = statistics.median(values)  # type: ignore[arg-type]
    return out


def ratios(results: Results) -> str:
    lines = ["| workload | trioanubis ÷ HAProxy | trioanubis ÷ best Python peer (which) |", "|---|---|---|"]
    for workload in WORKLOADS:
        m = medians(results, workload)
        if "trioanubis" not in m:
            continue
        ours = m["trioanubis"]
        lower_is_better = workload in ("memory", "latency")
        reference = m.get("haproxy+splice" if workload == "bulk" else "haproxy")
        peers = {n: v for n, v in m.items() if n in PYTHON_PEERS and v > 0}
        best = (min if lower_is_better else max)(peers, key=peers.__getitem__) if peers else None
        vs_haproxy = f"{ours / reference:.2f}×" if reference else "–"
        vs_peer = f"{ours / peers[best]:.2f}× ({best})" if best else "–"
        lines.append(f"| {workload}{' (lower is better)' if lower_is_better else ''} | {vs_haproxy} | "
                     f"{vs_peer} |")  # fmt: skip
    return "\n".join(lines) + portable_ratios(results)


def portable_ratios(results: Results) -> str:
    """The portable backend against the epoll one, when both ran."""
    lines = ["", "", "| workload | trioanubis-portable ÷ trioanubis (epoll) |", "|---|---|"]
    for workload in WORKLOADS:
        m = medians(results, workload)
        if m.get("trioanubis") and "trioanubis-portable" in m:
            lower = " (lower is better)" if workload in ("memory", "latency") else ""
            lines.append(f"| {workload}{lower} | {m['trioanubis-portable'] / m['trioanubis']:.2f}× |")
    return "\n".join(lines) if len(lines) > 4 else ""


def worker_ratios(results: Results) -> str:
    """Every core: 2 workers against 1, and against HAProxy with 2 threads."""
    lines = ["| workload | trioanubis-w2 ÷ trioanubis | trioanubis-w2 ÷ haproxy-t2 |", "|---|---|---|"]
    for workload in ("keepalive", "connrate"):
        m = medians(results, workload)
        if "trioanubis-w2" not in m:
            continue
        ours = m["trioanubis-w2"]
        one, t2 = m.get("trioanubis"), m.get("haproxy-t2")
        lines.append(f"| {workload} | {f'{ours / one:.2f}×' if one else '–'} | "
                     f"{f'{ours / t2:.2f}×' if t2 else '–'} |")  # fmt: skip
    return "\n".join(lines) if len(lines) > 2 else ""


SHAPED = ("trioanubis+mirror", "trioanubis+rate")


def shaping_ratios(results: Results) -> str:
    """What mirroring every connection, and a limit that never binds, cost against plain trioanubis."""
    lines = ["| workload | " + " | ".join(f"{name} ÷ trioanubis" for name in SHAPED) + " |",
             "|---|" + "---|" * len(SHAPED)]  # fmt: skip
    for workload in WORKLOADS:
        m = medians(results, workload)
        if not m.get("trioanubis") or not any(name in m for name in SHAPED):
            continue
        lower = " (lower is better)" if workload in ("memory", "latency") else ""
        cells = [f"{m[name] / m['trioanubis']:.2f}×" if name in m else "–" for name in SHAPED]
        lines.append(f"| {workload}{lower} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cpu_values(results: Results, workload: str, name: str) -> list[tuple[float, float]]:
    """`--profile`'s (user µs, system µs) per unit of work of each run of `name`."""
    return [v for v in results.values.get((f"{workload} cpu", name), []) if isinstance(v, tuple)]


PROFILE_RATIOS = ("trioanubis", "haproxy", "trioanubis+log")


def cpu_total(results: Results, workload: str, name: str) -> float:
    """Median user + system µs per unit of work of `name` (0 when it did not run)."""
    values = cpu_values(results, workload, name)
    return statistics.median(u + s for u, s in values) if values else 0.0


def cpu_table(results: Results) -> str:
    """`--profile`: the contenders' CPU per unit of work, median µs (min–max of the total)."""
    profiled = {c for (w, c) in results.values if w.endswith(" cpu")}
    if not profiled:
        return ""
    head = " | ".join(f"{w}: µs user + sys per {unit} (total min–max)" for w, unit in PROFILED.items())
    lines = [f"| contender | {head} |", "|---|" + "---|" * len(PROFILED)]
    for name in sorted(profiled, key=lambda n: (n != "trioanubis", n)):
        cells = []
        for workload in PROFILED:
            values = cpu_values(results, workload, name)
            if not values:
                cells.append("–")
                continue
            user = statistics.median(u for u, _ in values)
            system = statistics.median(s for _, s in values)
            totals = [u + s for u, s in values]
            cells.append(f"{user:.1f} + {system:.1f} = {statistics.median(totals):.1f} "
                         f"({min(totals):.1f}–{max(totals):.1f})")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + cpu_ratios(results) + cpu_pairs(results)


def cpu_ratios(results: Results) -> str:
    """trioanubis's CPU per unit of work against HAProxy's, and with the access log against without."""
    lines = ["", "", "| workload | CPU per unit: trioanubis ÷ haproxy | trioanubis+log ÷ trioanubis |",
             "|---|---|---|"]  # fmt: skip
    for workload in PROFILED:
        ours, theirs, logged = (cpu_total(results, workload, name) for name in PROFILE_RATIOS)
        if ours:
            lines.append(f"| {workload} | {f'{ours / theirs:.2f}×' if theirs else '–'} | "
                         f"{f'{logged / ours:.2f}×' if logged else '–'} |")  # fmt: skip
    return "\n".join(lines) if len(lines) > 4 else ""


# (more cores, one core): contenders run next to each other in every round, compared round by round.
CPU_PAIRS = (("trioanubis-w2", "trioanubis"), ("trioanubis-w2@base", "trioanubis@base"),
             ("haproxy-t2", "haproxy"))  # fmt: skip


def cpu_pairs(results: Results) -> str:
    """Two workers' (threads') CPU per unit against one's, round by round: each round's two runs are
    neighbours, so what drifts over the whole run (the machine's other load) cancels out of the
    ratio. Median (min–max) over the rounds."""
    lines = ["", "", "| CPU per unit, round by round | " + " | ".join(PROFILED) + " |",
             "|---|" + "---|" * len(PROFILED)]  # fmt: skip
    for more, one in CPU_PAIRS:
        cells = []
        for workload in PROFILED:
            theirs, ours = cpu_values(results, workload, one), cpu_values(results, workload, more)
            if not ours or len(ours) != len(theirs):
                cells.append("–")
                continue
            each = [(u + s) / (u1 + s1) for (u, s), (u1, s1) in zip(ours, theirs, strict=True)]
            cells.append(f"{statistics.median(each):.2f}× ({min(each):.2f}–{max(each):.2f})")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {more} ÷ {one} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 4 else ""


def machine() -> str:
    cpu = "unknown CPU"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for argv in (["haproxy", "-v"], ["nginx", "-v"], ["wrk", "-v"], ["iperf3", "-v"]):
        with suppress(OSError):
            out = subprocess.run(argv, capture_output=True, text=True)
            versions.append((out.stdout or out.stderr).splitlines()[0].strip())
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; " + "; ".join(versions))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--only", default="", help="comma-separated contender names")
    parser.add_argument("--workloads", default="", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--pproxy", default=shutil.which("pproxy") or "pproxy")
    parser.add_argument("--uvloop-python", default=sys.executable,
                        help="a python with uvloop installed (default: this one)")
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>.md")
    parser.add_argument("--source", default="", metavar="DIR",
                        help="run the trioanubis contenders from the source tree DIR instead of this one "
                             "(the compiled build: .ci/compiled-tree DIR)")
    parser.add_argument("--baseline", default="", metavar="DIR",
                        help="also run every trioanubis contender from the source tree DIR (a checkout "
                             "of main, say), as NAME@base, interleaved with this tree's")
    parser.add_argument("--profile", action="store_true",
                        help="also print each contender's user and system CPU per request (keepalive) "
                             "and per connection (connrate), read from /proc")  # fmt: skip
    parser.add_argument("--pin-load", default="", metavar="CPUS",
                        help="run wrk under taskset -c CPUS (e.g. 0), to see how much the load "
                             "generator competes with multi-core contenders")  # fmt: skip
    parser.add_argument("--pin", default="", metavar="C:L",
                        help="run each contender under taskset -c C, and the backends and wrk under "
                             "taskset -c L (e.g. 1:0): the contender gets a CPU of its own")  # fmt: skip
    parser.add_argument("--connections", type=int, default=50, metavar="N",
                        help="wrk's connections open at once in keepalive and connrate (50: each "
                             "balancer saturated; a few: one that sleeps between connections)")  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.connections <= 10_000:
        parser.error(f"--connections {args.connections}: expected 1 to 10000")
    WRK_CONNECTIONS[0] = args.connections
    if args.pin:
        contender_cpus, _, load_cpus = args.pin.partition(":")
        if not contender_cpus or not load_cpus:
            parser.error(f"--pin {args.pin!r}: expected CONTENDER_CPUS:LOAD_CPUS, e.g. 1:0")
        PIN_CONTENDER[:] = ["taskset", "-c", contender_cpus]
        PIN_BACKENDS[:] = ["taskset", "-c", load_cpus]
        args.pin_load = args.pin_load or load_cpus
    if args.pin_load:
        PIN_LOAD[:] = ["taskset", "-c", args.pin_load]
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    if args.uvloop_python == sys.executable:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            args.uvloop_python = "(no python with uvloop given)"
    results, skipped = run_all(args)
    report = [f"Machine: {machine()}", "",
              f"{args.rounds} interleaved rounds of {args.duration:g} s runs; median (min–max).", "",
              table(results), "", ratios(results), "", worker_ratios(results), "",
              shaping_ratios(results)]  # fmt: skip
    if args.profile:
        report += ["", cpu_table(results)]
    if args.pin:
        report.insert(2, f"Pinned: each contender under taskset -c {args.pin.partition(':')[0]}, "
                         f"the backends and wrk under taskset -c {args.pin_load}.")  # fmt: skip
    elif args.pin_load:
        report.insert(2, f"Load generator pinned: taskset -c {args.pin_load}.")
    if args.connections != 50:
        report.insert(2, f"wrk -c{args.connections} (keepalive, connrate).")
    report.insert(2, f"trioanubis: {tree_named(args.source)}"
                     + (f"; NAME@base: {tree_named(args.baseline)}" if args.baseline else "") + ".")
    if skipped:
        report += ["", "Skipped: " + "; ".join(skipped)]
    text = "\n".join(report)
    print(text)
    if args.save:
        today = datetime.date.today().isoformat()
        path = HERE / "results" / f"{today}.md"
        run = 1
        while path.exists():  # a later run the same day gets its own file
            run += 1
            path = HERE / "results" / f"{today}-{run}.md"
        path.write_text(f"# Benchmark run of {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n{text}\n")
        print(f"\nsaved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
