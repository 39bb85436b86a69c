"""The public API is typed: an example written as a user would type-checks under mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = """
from __future__ import annotations

import trio

import trioanubis
from trioanubis import Address, BalancerHandle, open_balancer
from trioanubis.testing import Kit, ProxyHandle, proxy

CONFIG = {"listeners": {"web": {"bind": "127.0.0.1:0", "pool": "app"}},
          "pools": {"app": {"servers": ["127.0.0.1:9001"]}}}


async def embedded() -> Address:
    async with open_balancer(CONFIG, io="portable") as lb:
        handle: BalancerHandle = lb
        await handle.drain("app", "127.0.0.1:9001")
        await handle.set_faults("app", "127.0.0.1:9001", {"latency": "100ms"})
        await handle.add_server("app", "127.0.0.1:9002", weight=2)
        ended: int = sum(handle.endings.values())
        assert ended >= 0
        return handle.addresses["web"]


def threaded() -> int:
    with proxy("127.0.0.1:6379", latency="100ms", seed=7) as p:
        handle: ProxyHandle = p
        handle.set_faults(close_after="64KiB", direction="downstream")
        with handle.faults(blackhole=True), handle.down():
            pass
        toxic: dict[str, object] = handle.add_toxic("latency", latency=100, jitter=10)
        assert toxic
        return handle.port


def kit() -> str:
    with Kit(seed=1) as k:
        return k.proxy("127.0.0.1:5432", timeout="1s").address


print(trioanubis.__version__, trio.run(embedded), threaded, kit)
"""


@pytest.mark.slow
def test_an_example_of_the_public_api_type_checks_strictly(tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(EXAMPLE)
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_a_misuse_fails_the_type_check(tmp_path: Path) -> None:
    example = tmp_path / "wrong.py"
    example.write_text(EXAMPLE.replace("weight=2", 'weight="2"'))
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert checked.returncode == 1 and "weight" in checked.stdout, checked.stdout
