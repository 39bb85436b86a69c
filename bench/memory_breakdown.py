"""Where an idle connection's memory goes: bytes per connection by allocation site and by object type.

    python bench/memory_breakdown.py [-n 2000] [--frames 12] [--io auto|portable] [--rss-only] [--source DIR]

Theory of operation: the same load as `compare.py --workloads memory`, taken
apart. An idle backend (peers/hold_server.py) holds every connection; the
balancer runs as a child process (this file with `--serve`), with
tracemalloc started before trioanubis is imported. The parent signals the
child once the balancer listens (SIGUSR1: take the baseline), opens N idle
client connections through it, waits until the backend holds all of them,
and signals again (SIGUSR2): the child compares a second snapshot with the
baseline and writes the report, which the parent prints:

- bytes per connection by allocating line (the innermost frame), and by the
  innermost frame inside trioanubis that led to it (which of our lines is
  responsible for an allocation made inside Trio or the stdlib);
- GC-tracked objects created since the baseline, per connection, by type,
  with `sys.getsizeof` (objects the collector does not track, such as
  floats, ints and bytes, appear only in the tracemalloc tables);
- the RSS growth per connection, which is what compare.py measures
  (tracemalloc's own bookkeeping inflates it: use `--rss-only` for a figure
  comparable with compare.py's).

Nothing here asserts anything; it is a measuring tool for bench/README.md.
`MEMORY_BREAKDOWN_EXAMPLES=TYPE` prints three new objects of that type (and
what refers to them) to stderr, to tell which `dict` or `list` a row is.
"""

from __future__ import annotations

import argparse
import collections
import gc
import linecache
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
PACKAGE = "trioanubis/"  # a frame in our package, whichever tree it is imported from
TOP = 30


# ------------------------------------------------------------------ the child


class Recorder:
    """What the child keeps between the two signals."""

    def __init__(self, out: Path, count: int) -> None:
        self.out = out
        self.count = count
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_ids: set[int] = set()
        self.baseline_rss = 0

    def take_baseline(self, _signum: int, _frame: FrameType | None) -> None:
        gc.collect()
        self.baseline_ids = {id(o) for o in gc.get_objects()}
        self.baseline_ids.update(id(o) for o in _frozen())
        self.baseline_rss = rss_bytes()
        if tracemalloc.is_tracing():
            self.baseline = tracemalloc.take_snapshot()
        self.out.with_suffix(".ready").write_text("baseline\n")

    def report(self, _signum: int, _frame: FrameType | None) -> None:
        rss = rss_bytes()
        lines = [f"connections: {self.count}",
                 f"RSS growth per connection: {(rss - self.baseline_rss) / self.count:,.0f} B"]  # fmt: skip
        if self.baseline is not None:
            lines += self._by_site(tracemalloc.take_snapshot(), self.baseline)
            self.baseline = None
        lines += self._by_type()
        partial = self.out.with_suffix(".partial")
        partial.write_text("\n".join(lines) + "\n")
        partial.rename(self.out)  # the parent waits for the name: never reads half a report

    def _by_site(self, now: tracemalloc.Snapshot, baseline: tracemalloc.Snapshot) -> list[str]:
        n = self.count
        by_line: collections.Counter[str] = collections.Counter()
        by_ours: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        total = 0
        for diff in now.compare_to(baseline, "traceback"):
            if diff.size_diff <= 0:
                continue
            total += diff.size_diff
            frames = list(reversed(diff.traceback))  # a Traceback runs from the oldest frame: innermost first
            inner = _where(frames[0])
            by_line[inner] += diff.size_diff
            counts[inner] += diff.count_diff
            ours = next((f for f in frames if _ours(f.filename)), None)
            site = f"{_where(ours)}  →  {inner}" if ours is not None and ours is not frames[0] else inner
            by_ours[site] += diff.size_diff
        lines = ["", f"tracemalloc, bytes per connection: {total / n:,.0f}", "",
                 "| allocating line | B/conn | blocks/conn |", "|---|---|---|"]  # fmt: skip
        for where, size in by_line.most_common(TOP):
            if size / n >= 1:
                lines.append(f"| {where} | {size / n:,.0f} | {counts[where] / n:.2f} |")
        lines += ["", "| our line → allocating line | B/conn |", "|---|---|"]
        for where, size in by_ours.most_common(TOP):
            if size / n >= 1:
                lines.append(f"| {where} | {size / n:,.0f} |")
        return lines

    def _by_type(self) -> list[str]:
        n = self.count
        gc.collect()
        sizes: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        objects = gc.get_objects()
        for obj in objects:
            if id(obj) in self.baseline_ids or obj is objects:
                continue
            name = type(obj).__qualname__
            code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
            if code is not None:  # which coroutine or generator: their frames are most of a connection
                name = f"{name} {code.co_qualname}"
            if os.environ.get("MEMORY_BREAKDOWN_EXAMPLES") == name and counts[name] < 3:
                print(name, sys.getsizeof(obj), repr(obj)[:300],
                      [type(r).__qualname__ for r in gc.get_referrers(obj)][:5], file=sys.stderr)
            sizes[name] += sys.getsizeof(obj)
            counts[name] += 1
        total = sum(sizes.values())
        title = f"GC-tracked objects since the baseline, sys.getsizeof per connection: {total / n:,.0f} B"
        lines = ["", title,
                 "", "| type | objects/conn | B/conn |", "|---|---|---|"]  # fmt: skip
        for name, size in sizes.most_common(TOP):
            if counts[name] / n >= 0.05:
                lines.append(f"| {name} | {counts[name] / n:.2f} | {size / n:,.0f} |")
        return lines


def _frozen() -> list[object]:
    """Objects `gc.freeze()` moved out of the collector's generations (settle_gc does it at start-up)."""
    count = gc.get_freeze_count()
    if not count:
        return []
    gc.unfreeze()
    try:
        return gc.get_objects()
    finally:
        gc.freeze()


def _ours(filename: str) -> bool:
    return PACKAGE in filename and "site-packages" not in filename


def _where(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for prefix in (os.environ.get("PYTHONPATH", str(HERE.parent)) + "/", os.path.dirname(os.__file__) + "/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if "site-packages/" in name:
        name = name.split("site-packages/", 1)[1]
    text = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{name}:{frame.lineno} `{text[:60]}`" if text else f"{name}:{frame.lineno}"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(config: str, out: Path, count: int, frames: int, trace: bool) -> int:
    if trace:
        tracemalloc.start(frames)
    recorder = Recorder(out, count)
    signal.signal(signal.SIGUSR1, recorder.take_baseline)
    signal.signal(signal.SIGUSR2, recorder.report)
    from trioanubis.cli import main

    return main(["--log-level", "warning", "run", "-c", config])


# ------------------------------------------------------------------ the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: str, check: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {condition}")


def answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return len(out.splitlines())


def measure(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle, listen = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "anubis.toml"
        config.write_text(f"""
[settings]
access_log = false
io = "{args.io}"
[listeners.bench]
bind = "127.0.0.1:{listen}"
pool = "bench"
[pools.bench]
servers = ["127.0.0.1:{idle}"]
""")
        out = Path(tmp) / "report.txt"
        backend = subprocess.Popen([sys.executable, str(HERE / "peers" / "hold_server.py"), str(idle)])
        child_argv = [sys.executable, __file__, "--serve", str(config), "--out", str(out),
                      "-n", str(args.n), "--frames", str(args.frames)]  # fmt: skip
        if args.rss_only:
            child_argv.append("--rss-only")
        child = subprocess.Popen(child_argv, env={**os.environ, "PYTHONPATH": args.source})
        sockets: list[socket.socket] = []
        try:
            wait_for("the backend", lambda: answers(idle))
            wait_for("the balancer", lambda: answers(listen))
            time.sleep(0.5)  # let the connections of the wait above end
            child.send_signal(signal.SIGUSR1)
            wait_for("the baseline", out.with_suffix(".ready").exists)
            for _ in range(args.n):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", listen))
                sockets.append(s)
            wait_for(f"{args.n} connections at the backend", lambda: established(idle) >= args.n)
            time.sleep(1.0)  # a Timer tick or two: what a relay holds once it is idle
            child.send_signal(signal.SIGUSR2)
            wait_for("the report", out.exists, timeout=600)
            print(out.read_text())
        finally:
            for s in sockets:
                s.close()
            for process in (child, backend):
                process.terminate()
                process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="idle connections (default 2000)")
    parser.add_argument("--frames", type=int, default=12, help="traceback depth kept by tracemalloc")
    parser.add_argument("--io", default="auto", help="the readiness backend: auto, epoll or portable")
    parser.add_argument("--rss-only", action="store_true", help="no tracemalloc: RSS and object types only")
    parser.add_argument("--source", default=str(HERE.parent),
                        help="where trioanubis is imported from (another tree, `git archive`d)")  # fmt: skip
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve(args.serve, Path(args.out), args.n, args.frames, not args.rss_only))
    measure(args)


if __name__ == "__main__":
    main()
