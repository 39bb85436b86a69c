"""How often a balancer sleeps and wakes per unit of work: trioanubis against HAProxy, one core or two.

    python bench/sleeps.py [--only trioanubis,trioanubis-w2,haproxy,haproxy-t2] [--duration 4]
                           [--workload connrate|keepalive] [--source DIR]

Theory of operation: a balancer that always has work never sleeps; one that
runs out of it sleeps in `epoll_wait` and is switched out, and the next
event wakes it with caches other processes have used meanwhile. How often
that happens per connection (or request) explains CPU per unit of work
that instruction counts do not, e.g. why two workers on two shared cores
cost more per connection than one. Each contender of compare.py runs
behind the same two nginx backends under `wrk -t1 -c50`; while it does,
`perf stat` counts, in the balancer's processes only, the kernel's
tracepoints for `epoll_wait`, `epoll_ctl`, `accept4` and `getsockopt` (the
listener's count of its backlog) entries and for
context switches (`sched:sched_switch`, the process switched out), and
from /proc/PID/task/*/sched, in the processes that serve (the workers, where
there are workers), the switches split into sleeps and preemptions, and
the moves to another core. Printed
per unit, with the CPU per unit /proc gives, and the supervisor's share
for a contender with workers.

Needs `perf` with tracepoints (Debian's linux-perf; root or a low
`kernel.perf_event_paranoid`). Nothing here asserts anything; it is a
measuring tool for bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

EVENTS = {
    "syscalls:sys_enter_epoll_wait": "epoll_wait",
    "syscalls:sys_enter_epoll_ctl": "epoll_ctl",
    "syscalls:sys_enter_accept4": "accept4",
    "syscalls:sys_enter_getsockopt": "getsockopt",
    "sched:sched_switch": "switched out",
}


SCHED = {
    "nr_voluntary_switches": "slept",
    "nr_involuntary_switches": "preempted",
    "se.nr_migrations": "moved core",
}


def sched_counts(pids: list[int]) -> dict[str, float]:
    """/proc/PID/task/TID/sched's switch and migration counts, summed over every thread of `pids`
    (HAProxy's threads each count their own; a file gone meanwhile counts none)."""
    counts = dict.fromkeys(SCHED.values(), 0.0)
    for pid in pids:
        for path in Path(f"/proc/{pid}/task").glob("*/sched"):
            try:
                text = path.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() in SCHED:
                    counts[SCHED[key.strip()]] += float(value)
    return counts


def counted(pids: list[int], run: Callable[[], float]) -> tuple[dict[str, float], float]:
    """`run()` (the workload: its units done) while perf counts EVENTS in `pids`."""
    argv = ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-p", ",".join(map(str, pids))]
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        units = run()
    finally:
        perf.send_signal(signal.SIGINT)
        _, report = perf.communicate(timeout=30)
    counts: dict[str, float] = {}
    for line in report.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in EVENTS:
            counts[EVENTS[fields[2]]] = float(fields[0]) if fields[0].replace(".", "").isdigit() else 0.0
    return counts, units


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="trioanubis,trioanubis-w2,haproxy,haproxy-t2",
                        help="compare.py's contender names")  # fmt: skip
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--workload", default="connrate", choices=("connrate", "keepalive"))
    parser.add_argument("--source", default="", help="run trioanubis from this source tree")
    args = parser.parse_args()
    if not shutil.which("perf"):
        print("sleeps.py needs perf (apt-get install linux-perf)", file=sys.stderr)
        return 1
    wanted = args.only.split(",")
    args.pproxy, args.uvloop_python = "pproxy", sys.executable  # what compare.others() reads
    chosen = [c for c in compare.our_contenders(args.source) + compare.others(args) if c.name in wanted]
    workload = compare.run_connrate if args.workload == "connrate" else compare.run_keepalive
    unit = compare.PROFILED[args.workload]
    with compare.start_backends() as backends:
        for contender in chosen:
            with compare.running(contender, backends.http) as (port, process):
                workers = compare.children(process.pid)
                pids = [process.pid, *workers]
                before = {pid: compare.cpu_times(pid) for pid in pids}
                switches = sched_counts(workers or pids)
                counts, units = counted(pids, lambda: workload(port, args.duration) * args.duration)
                after = {pid: compare.cpu_times(pid) for pid in pids}
                for name, value in sched_counts(workers or pids).items():
                    counts[name] = value - switches[name]
            units = max(units, 1.0)
            user = (after[process.pid][0] - before[process.pid][0]) * 1e6 / units
            system = (after[process.pid][1] - before[process.pid][1]) * 1e6 / units
            print(f"{contender.name}: {units:,.0f} {unit}s, {user:.1f} + {system:.1f} µs per {unit}")
            if workers:  # the supervisor's own share: cpu_times counts its children in
                own = [(after[pid][0] - before[pid][0]) + (after[pid][1] - before[pid][1]) for pid in workers]
                supervisor = (after[process.pid][0] + after[process.pid][1] - before[process.pid][0]
                              - before[process.pid][1] - sum(own))  # fmt: skip
                print(f"  supervisor       {supervisor * 1e6 / units:6.2f} µs per {unit}")
            for name in (*EVENTS.values(), *SCHED.values()):
                print(f"  {name:16} {counts.get(name, 0.0) / units:6.3f} per {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
