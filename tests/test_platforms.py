"""Where epoll does not exist: the package imports, `anubis --version` and `check` work, and it proxies.

The machine running the suite is Linux, so a subprocess makes the Linux-only
names unavailable first (as on macOS, BSD or Windows): Trio is imported
(it picks its own I/O backend at import), then `select.epoll` and the
`EPOLL*` constants, `socket.SOCK_NONBLOCK`, `os.splice` and the `fcntl`
module are taken away (and, as on Windows, `resource` and `signal.SIGHUP`).
Every module of the package is then imported, the
CLI's `--version` and `check` run, and a request is proxied end to end.
Trio's own I/O manager keeps a private copy of `select` (it stands in for
the kqueue or Windows backend Trio would have chosen elsewhere).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import contextlib, io, os, pkgutil, select, socket, sys

import types

import trio  # Trio chooses its own I/O backend now, as it would on another platform
import trio._core._io_epoll as trio_io

# Trio's own I/O manager keeps the epoll it chose (on macOS it would be kqueue):
# it gets a private copy of the select module; everything else loses the names.
trio_io.select = types.SimpleNamespace(**vars(select))
for name in [n for n in dir(select) if n == "epoll" or n.startswith("EPOLL")]:
    delattr(select, name)
del socket.SOCK_NONBLOCK
del os.splice
sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError
# Windows has neither (macOS and BSD do): the package must not need them to start.
sys.modules["resource"] = None
import signal
del signal.SIGHUP

import trioanubis
for module in pkgutil.walk_packages(trioanubis.__path__, "trioanubis."):
    if module.name != "trioanubis.__main__":  # the script itself: it only imports cli, then runs
        __import__(module.name)
print("imported", len(list(pkgutil.walk_packages(trioanubis.__path__))), "modules")

from trioanubis import cli

out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.main(["--version"])
print(out.getvalue().strip())

out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = cli.main(["check", "-c", sys.argv[1]])
print("check exit", code, out.getvalue().strip().splitlines()[-1])

code = cli.main(["run", "-c", sys.argv[1], "--io", "epoll"])  # its error goes to stderr (fd 2)
print("run --io epoll exit", code)

from trioanubis.app import Balancer, run_until_signalled
from trioanubis.config import parse_config


async def echo(stream):
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def main():
    async with trio.open_nursery() as nursery:
        backends = await nursery.start(trio.serve_tcp, echo, 0)
        port = backends[0].socket.getsockname()[1]
        config = parse_config({
            "listeners": {"web": {"bind": "127.0.0.1:0", "pool": "web"}},
            "pools": {"web": {"servers": [f"127.0.0.1:{port}"]}},
        })
        balancer = Balancer(config)
        bound = await nursery.start(run_until_signalled, balancer)
        address = next(iter(bound.values()))
        stream = await trio.open_tcp_stream(address.host, address.port)
        payload = os.urandom(1 << 20)
        received = bytearray()
        async with trio.open_nursery() as inner:
            async def send():
                await stream.send_all(payload)
                await stream.send_eof()
            inner.start_soon(send)
            async for data in stream:
                received += data
        assert bytes(received) == payload, "payload mismatch"
        print("proxied", len(received), "bytes through", balancer.poller.caps.name)
        nursery.cancel_scope.cancel()

trio.run(main)
'''


@pytest.mark.slow
def test_without_linux_only_names_the_package_imports_checks_and_proxies() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "anubis.toml")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("imported ")
    assert lines[1].startswith("anubis ")
    assert lines[2] == "check exit 0 io: portable"
    assert lines[3] == "run --io epoll exit 1"
    assert "anubis: io = 'epoll': this platform has no epoll" in result.stderr
    assert lines[4] == f"proxied {1 << 20} bytes through portable"
