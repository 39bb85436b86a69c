"""The agent check's I/O: ask the agent every interval, tell the pool what its answer changes.

Theory of operation: `run_agent` is one task per server, beside the server's
health check in the checker's nursery (so with `workers = N` it runs in the
supervisor only, and what it changes reaches the workers with the state push,
like every health verdict). Each round `ask_agent` connects to the agent's host
and port, sends `send` if any, and reads one line through `LineReader`, the
whole round bounded by `timeout`; every failure becomes an `Outcome` with a
reason, never an exception. `agent_state.next_status` decides; this module
only carries the decision out, through the pool's public methods and the
server's `Joined` health (checker.py), which owns the up/down verdict and the
weight: the weight is the server's weight × slow start's ramp × the agent's
percent, recomputed after every answer, so an operator's new weight gets the
agent's percent at the agent's next answer.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from typing import TYPE_CHECKING, Final, Protocol

import trio

from trioanubis.config import Address, AgentConfig
from trioanubis.health.agent_state import (
    AgentLineError,
    AgentStatus,
    LineReader,
    Outcome,
    next_status,
    outcome_of,
    withdraw,
)
from trioanubis.proxy.connect import reason_for
from trioanubis.resolve import resolve_address

if TYPE_CHECKING:
    from trioanubis.pool import Pool, Server

log = logging.getLogger("trioanubis.health")

# Rounds of one agent are spread by ±10%, as health checks are.
JITTER: Final = 0.1


class Joined(Protocol):
    """What the agent asks of its server's health (checker.ServerHealth joins checks and agent)."""

    @property
    def pool(self) -> Pool: ...
    @property
    def server(self) -> Server: ...
    def take_down(self, reason: str) -> None: ...
    def release(self, reason: str) -> None: ...
    def apply_weight(self) -> None: ...


async def run_agent(health: Joined, config: AgentConfig) -> None:
    """Ask `health.server`'s agent every `config.interval` until cancelled."""
    host = config.host or health.server.address.host
    while True:
        outcome = await ask_agent(host, config)
        apply_outcome(health, outcome)
        await trio.sleep(config.interval * random.uniform(1 - JITTER, 1 + JITTER))


async def ask_agent(host: str, config: AgentConfig) -> Outcome:
    """One agent check: its line, or why there is none; bounded by `config.timeout`."""
    reader = LineReader()
    with trio.move_on_after(config.timeout):
        try:
            return outcome_of(await _converse(host, config, reader))
        except AgentLineError as exc:
            return Outcome("invalid", str(exc))
        except socket.gaierror:
            return Outcome("error", f"cannot resolve {host!r}")
        except OSError as exc:
            return Outcome("error", reason_for(exc.errno) if exc.errno else str(exc) or "no address")
        except trio.BrokenResourceError:
            return Outcome("error", "reset")
    return Outcome("error", f"timeout after {config.timeout:g}s")


async def _converse(host: str, config: AgentConfig, reader: LineReader) -> bytes:
    stream = await _connect(Address(host, config.port))
    async with stream:
        if config.send:
            with contextlib.suppress(trio.BrokenResourceError):  # it may answer without reading
                await stream.send_all(config.send)
        while True:
            data = await stream.receive_some(reader.room)
            if not data:
                raise reader.eof()
            line = reader.feed(data)
            if line is not None:
                return line


async def _connect(address: Address) -> trio.SocketStream:
    """A connection to the first of `address`'s addresses that accepts; OSError otherwise."""
    last: OSError | None = None
    for family, sockaddr in await resolve_address(address):
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise last or OSError(f"{address.host!r} has no address")


def apply_outcome(health: Joined, outcome: Outcome) -> None:
    """Carry out what one check changes; the status is recorded first, so the verdicts see it."""
    pool, server = health.pool, health.server
    before = server.agent or AgentStatus()
    status, actions = next_status(before, outcome, draining=server.draining, healthy=server.healthy,
                                  fall=pool.config.health.fall)  # fmt: skip
    pool.record_agent(server, status)
    _log(pool, server, before, status)
    if actions.drain is not None:
        pool.set_draining(server, actions.drain)
    if actions.down:
        health.take_down(actions.down)
    if actions.release:
        health.release(f"agent says up ({status.said})" if status.result == "ok" else "agent withdrawn")
    health.apply_weight()


def withdraw_agent(health: Joined) -> None:
    """The agent was configured away (a reload): what it held the server in ends now."""
    server = health.server
    if server.agent is None:
        return
    status, actions = withdraw(server.agent, draining=server.draining)
    health.pool.record_agent(health.server, status)
    if actions.drain is not None:
        health.pool.set_draining(server, actions.drain)
    if actions.release:
        health.release("agent removed")
    health.apply_weight()


def _log(pool: Pool, server: Server, before: AgentStatus, after: AgentStatus) -> None:
    """A line when the agent's state changes (a weight alone: debug, an agent may follow its CPU),
    when it goes silent, and when it loses its influence."""
    where = f"pool {pool.name}: server {server.name}: agent"
    if after.result == "ok" and after.said != before.said:
        level = logging.INFO if after.state != before.state else logging.DEBUG
        log.log(level, "%s says %s", where, after.said)
    elif after.result != "ok" and before.result in ("ok", ""):
        log.warning("%s check failed: %s", where, after.said)
    if before.influences and not after.influences and after.result != "ok":
        log.warning("%s failed %d checks in a row: its weight and state no longer apply", where,
                    after.failures)  # fmt: skip
