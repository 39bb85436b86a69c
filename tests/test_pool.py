"""The live view (pool.py): one writer of server state, and its wake-up contract with held clients."""

from __future__ import annotations

import ast
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import config_for
from trioanubis.config import parse_config
from trioanubis.pool import Pool

PACKAGE = Path(__file__).resolve().parent.parent / "trioanubis"
# A server's state and counters: names no other kind of object here has.
SERVER_STATE = {"healthy", "draining", "removed", "effective_weight", "config_weight", "sockaddrs",
                "fault_override", "config_faults", "checks_passed", "checks_failed", "checks_skipped",
                "last_check", "consecutive_failures", "connect_failures", "ewma", "agent"}  # fmt: skip
# Names other objects share: only written on something named like a server.
SERVER_FIELDS = {"weight", "priority", "max_connections", "send_proxy", "faults", "active", "total",
                 "bytes_in", "bytes_out"}  # fmt: skip
# Limits.draining is the process's; control.py's `said` records the operator's word about a server.
NOT_A_SERVER = {"self", "limits", "said"}


def server_writes(source: str) -> list[tuple[int, str]]:
    """(line, "obj.attribute") for each assignment to a server's state in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])  # fmt: skip
        for target in targets:
            for each in target.elts if isinstance(target, ast.Tuple) else [target]:
                if not isinstance(each, ast.Attribute):
                    continue
                base = each.value
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if name in NOT_A_SERVER:
                    continue
                if each.attr in SERVER_STATE or (each.attr in SERVER_FIELDS and "server" in name):
                    found.append((node.lineno, f"{name}.{each.attr}"))
    return found


@pytest.mark.slow
def test_only_the_pool_writes_a_servers_state() -> None:
    """pool.py is the single writer: health checks, discovery, the spawner, a reload, the admin and a
    worker's merge change a server through a Pool method, so each change is logged once and the
    candidates rebuilt."""
    writes = [f"{path.relative_to(PACKAGE)}:{line}: {what}"
              for path in sorted(PACKAGE.rglob("*.py")) if path.name != "pool.py"
              for line, what in server_writes(path.read_text())]  # fmt: skip
    assert writes == []


def test_the_writer_check_sees_what_it_looks_for() -> None:
    source = "server.healthy = 1\nserver.active += 1\nrelay.active = 1\ns.sockaddrs = []\nlimits.draining = 1"
    assert server_writes(source) == [(1, "server.healthy"), (2, "server.active"), (4, "s.sockaddrs")]


async def test_a_freed_slot_wakes_the_first_held_client_and_no_health_check() -> None:
    """The wake-up contract: a release pokes the head of the line (a held client may connect now),
    and nothing that waits for changes: health checks sleep on through every closed connection."""
    pool = Pool(parse_config(config_for(["127.0.0.1:1"], queue_timeout="1h")).pools["test"],
                initially_healthy=True)  # fmt: skip
    server = pool.servers[0]
    woken: list[str] = []

    class Held:
        seq = 1

    async def wait(name: str, waiting: Callable[[], Awaitable[object]]) -> None:
        await waiting()
        woken.append(name)

    held = Held()
    assert pool.held.join(held, capacity=10)
    ticket = pool.held.ticket(held)
    ticket.turn = trio.Event()  # it tried and found no room: it waits for the next poke
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "changed", pool.wait_changed)
        nursery.start_soon(wait, "held", ticket.turn.wait)
        await trio.testing.wait_all_tasks_blocked()
        pool.reserve(server)
        pool.release(server, 10, 20)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["held"]  # the first in line, and not the health checks
        pool.changed()
    assert woken == ["held", "changed"]
