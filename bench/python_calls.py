"""Python-level calls per connection: what the interpreter still runs for a connection, by function.

    python bench/python_calls.py [--source DIR] [-n 2000] [--concurrency 50] [--top 40]

Theory of operation: in the compiled build (`--source` a tree from
`.ci/compiled-tree`) our data path's modules are C, and `sys.setprofile`
sees none of their calls; what it sees is the Python code a connection still
runs: Trio's scheduler and traps, `outcome`, the standard library, and the
few modules of ours left uncompiled. Each function is counted once per call
and once per resumption (a coroutine's step is a "call"), and each C function
called from Python code once. The balancer runs twice behind the same echo
backend as instructions.py's (start and stop only, then `-n` connections,
`--concurrency` at a time, the server closing first), and this prints the
second run's counts minus the first's, per connection. It names what costs
without timing it: the profile hook slows every call, so compare counts,
never times. Nothing here asserts anything; it is a measuring tool for
bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instructions import connect_many, echo_server, free_port, wait_port

# The balancer's process: the profile hook on for its whole life, its counts written at exit.
RUNNER = """
import atexit, collections, json, runpy, sys, threading
source, out = sys.argv.pop(1), sys.argv.pop(1)
if source:
    sys.path.insert(0, source)
counts = collections.Counter()

def hook(frame, event, arg):
    if event == "call":
        code = frame.f_code
        counts[code.co_filename.rpartition("site-packages/")[2] + ":" + code.co_qualname] += 1
    elif event == "c_call":
        counts["C:" + getattr(arg, "__qualname__", repr(arg))] += 1

def dump():
    sys.setprofile(None)
    threading.setprofile(None)
    with open(out, "w") as f:
        json.dump(dict(counts), f)

atexit.register(dump)
import trio._core._run
trio._core._run._r.seed(0)  # Trio reverses a batch of runnable tasks at random: seeded, runs schedule alike
threading.setprofile(hook)
sys.setprofile(hook)
runpy.run_module("trioanubis", run_name="__main__")
"""


def count(args: argparse.Namespace, backend: int, connections: int) -> collections.Counter[str]:
    """The balancer's Python-level calls for one run: start, `connections` connections, SIGTERM, exit."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = Path(tmp) / "anubis.toml"
        config.write_text(f'[settings]\naccess_log = false\n[listeners.bench]\nbind = "127.0.0.1:{port}"\n'
                          f'pool = "bench"\n[pools.bench]\nservers = ["127.0.0.1:{backend}"]\n'
                          'health = { check = "none" }\n')  # fmt: skip
        out = Path(tmp) / "counts.json"
        command = [sys.executable, "-c", RUNNER, args.source, str(out), "--log-level", "warning", "run", "-c",
                   str(config)]  # fmt: skip
        process = subprocess.Popen(command, env={**os.environ, "PYTHONHASHSEED": "0"})
        wait_port(port)
        if connections:
            connect_many(port, connections, args.concurrency)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        return collections.Counter(json.loads(out.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="", help="a source tree to measure instead of this one")
    parser.add_argument("-n", type=int, default=2000, help="connections")
    parser.add_argument("--concurrency", type=int, default=50, help="connections at a time")
    parser.add_argument("--top", type=int, default=40, help="functions to print")
    args = parser.parse_args()
    backend, stop = echo_server(answer_once=True)
    try:
        base = count(args, backend, 0)
        run = count(args, backend, args.n)
    finally:
        stop.set()
    run.subtract(base)
    tree = args.source or str(Path(__file__).resolve().parent.parent)
    print(f"{tree}: calls per connection ({args.concurrency} at a time, the server closing first)")
    for name, calls in run.most_common(args.top):
        print(f"{calls / args.n:8.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
