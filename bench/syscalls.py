"""System calls per connection, counted by strace: trioanubis against HAProxy.

    python bench/syscalls.py [--only trioanubis,haproxy] [--duration 3] [--source DIR]

Theory of operation: a system call count per connection does not depend on
how busy the machine is, only on how connections arrive, so two trees (or
two balancers) can be compared on shared cores where their rates cannot.
Each contender of compare.py runs under `strace -f -c` twice, behind the
same two nginx backends: idle for `--duration` seconds (its timers, its
health checks), then under the connection-rate workload (`wrk -t1 -c50`,
`Connection: close`) for as long. Each run's counts minus the idle run's,
divided by the connections wrk completed, is the table it prints: calls per
connection by system call. strace slows the traced process several times,
so the rate is not the one of a normal run (more connections wait in the
accept queue per wake-up): read the counts side by side, not as absolutes.

Nothing here asserts anything; it is a measuring tool for bench/README.md.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_counts(text: str) -> Counter[str]:
    """strace -c's table as {system call: calls}."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and match.group(2) != "total":
            counts[match.group(2)] += int(match.group(1))
    return counts


def traced(
    contender: compare.Contender, backends: list[int], duration: float, load: bool
) -> tuple[Counter[str], float]:
    """One run under strace: the system call counts and the connections wrk completed."""
    port = compare.free_port()
    with tempfile.TemporaryDirectory(prefix=f"syscalls-{contender.name}-") as tmp:
        out = Path(tmp) / "strace.out"
        argv = ["strace", "-f", "-c", "-o", str(out), *contender.command(Path(tmp), port, backends)]
        tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            compare.wait_port(port, timeout=60)
            connections = 0.0
            if load:
                connections = compare.run_connrate(port, duration) * duration
            else:
                time.sleep(duration)
        finally:
            for pid in compare.children(tracer.pid):  # the traced balancer: strace exits after it
                subprocess.run(["kill", "-TERM", str(pid)], check=False)
            try:
                tracer.wait(30)
            except subprocess.TimeoutExpired:
                tracer.send_signal(signal.SIGKILL)
                tracer.wait()
        return parse_counts(out.read_text()), connections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="trioanubis,haproxy", help="compare.py's contender names")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--source", default="", help="run trioanubis from this source tree")
    args = parser.parse_args()
    wanted = args.only.split(",")
    args.pproxy, args.uvloop_python = "pproxy", sys.executable  # what compare.others() reads
    chosen = [c for c in compare.our_contenders(args.source) + compare.others(args) if c.name in wanted]
    with compare.start_backends() as backends:
        for contender in chosen:
            idle, _ = traced(contender, backends.http, args.duration, load=False)
            loaded, connections = traced(contender, backends.http, args.duration, load=True)
            per = {name: (loaded[name] - idle[name]) / max(connections, 1.0) for name in loaded}
            total = sum(per.values())
            print(f"{contender.name}: {connections:,.0f} connections, "
                  f"{total:.2f} system calls per connection")
            for name, calls in sorted(per.items(), key=lambda item: -item[1]):
                if calls >= 0.005:
                    print(f"  {name:16} {calls:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
