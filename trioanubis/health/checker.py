"""The health-check nursery of one pool: one task per server, all cancelled with the pool.

Theory of operation: `run_health_checks` starts a task per server, reports
`task_status.started()` once every server has had its first check (each
bounded by the check timeout), and then keeps watching the pool for servers
that join (reload, discovery) to start their tasks, and servers that leave to
cancel theirs. Results go through `Hysteresis` and only transitions reach the
pool, which logs each one once. A probe that ran short locally (out of
descriptors or memory) is skipped: counted in `checks_skipped`, logged once
per episode, and never fed to `Hysteresis`.

With `check = "none"` no probe runs: servers start up, and a server that
passive ejection took out is put back after `eject_for`.

While the pool holds clients (hold.py) its servers are probed every 100 ms
and the first passing check brings a server up, without waiting for `rise`.

A server that comes up with `slow_start` set gets a ramp task that raises its
effective weight step by step; the ramp is cancelled if it goes down again.

With `agent` set, the server's agent check (agent.py) runs beside its health
check, in the same per-server nursery. `ServerHealth` joins the two: the
checks decide `checks_up`, the agent may hold the server down or drained and
scale its weight, and the server is up only when the checks say so and the
agent does not hold it down.
"""

from __future__ import annotations

import logging
import random
from typing import Final, final

import trio

from trioanubis.errors import OutOfResources
from trioanubis.health.agent import run_agent, withdraw_agent
from trioanubis.health.probe import plan_of, probe
from trioanubis.health.state import Hysteresis, next_slow_start_step, slow_start_weight
from trioanubis.pool import Pool, Server
from trioanubis.proxy.proxy_protocol import build_local
from trioanubis.resolve import resolve_address

log = logging.getLogger("trioanubis.health")

# Checks of one server are spread by ±10% so checks of many servers don't align.
JITTER: Final = 0.1


async def run_health_checks(
    pool: Pool, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Check every server of `pool` until cancelled; started() after the first round."""
    scopes: dict[Server, trio.CancelScope] = {}
    async with trio.open_nursery() as nursery:
        first_round = [_start(nursery, pool, server, scopes) for server in pool.servers]
        for done in first_round:
            await done.wait()
        task_status.started()
        while True:
            await pool.wait_changed()
            for server in pool.servers:
                if server not in scopes:
                    _start(nursery, pool, server, scopes)
            for server in [s for s in scopes if s.removed]:
                scopes.pop(server).cancel()


def _start(
    nursery: trio.Nursery, pool: Pool, server: Server, scopes: dict[Server, trio.CancelScope]
) -> trio.Event:
    scope = trio.CancelScope()
    first = trio.Event()
    scopes[server] = scope
    nursery.start_soon(_check_server, pool, server, scope, first)
    return first


async def _check_server(pool: Pool, server: Server, scope: trio.CancelScope, first: trio.Event) -> None:
    with scope:
        try:
            async with trio.open_nursery() as nursery:  # the slow-start ramp and the agent
                health = ServerHealth(pool, server, nursery)
                agent = pool.config.health.agent
                if agent is not None:
                    nursery.start_soon(run_agent, health, agent)
                else:
                    withdraw_agent(health)  # one a reload took away: its hold ends
                if pool.config.health.check == "none":
                    first.set()
                    await _readmit_ejected(health)
                else:
                    await _probe_forever(health, first)
        finally:
            first.set()


@final
class ServerHealth:
    """One server's two opinions, its checks' and its agent's, and the one place that joins them.

    The server is up when its checks say so (`checks_up`; always with check = "none") and its
    agent holds it not down. While the agent holds it down, the checks go on deciding
    `checks_up`, so that when the agent takes its word back the server comes up at once if
    the checks pass. The weight is the server's weight × the slow-start ramp × the agent's
    percent; every change of one of them recomputes it.
    """

    def __init__(self, pool: Pool, server: Server, nursery: trio.Nursery) -> None:
        self.pool = pool
        self.server = server
        self.checks_up = True
        self.ramp = 1.0  # slow start's share of the weight now
        self._nursery = nursery
        self._ramp_scope = trio.CancelScope()

    @property
    def held_down(self) -> bool:
        """Whether the server is held down whatever its checks say: its agent said down, fail or
        stopped, or its process is known not to run (a spawned replica restarting)."""
        server = self.server
        return server.process_down or (server.agent is not None and bool(server.agent.down))

    def checks_say(self, state: Hysteresis, ok: bool, reason: str, *, first_check: bool) -> None:
        """Fold one check result in; only transitions reach the pool."""
        pool, server = self.pool, self.server
        was_up = self.checks_up if self.held_down else server.healthy
        now_up = state.observe(was_up, ok) or (ok and len(pool.held) > 0)  # clients wait: no rise
        self.checks_up = now_up
        if now_up and not was_up:
            self.bring_up(reason)
        elif not now_up and (was_up or first_check):
            self.take_down(reason, first_check=first_check)
        elif ok and len(pool.held):
            pool.changed()  # it answers while clients wait (a refused connect held them): retry

    def bring_up(self, reason: str, *, ramp: bool = True) -> None:
        """Up, ramping over slow_start; not while the agent holds it down."""
        if self.held_down:
            return
        if ramp:
            self._start_ramp()
        self.pool.mark_up(self.server, reason)

    def take_down(self, reason: str, *, first_check: bool = False) -> None:
        self._ramp_scope.cancel()
        self.pool.mark_down(self.server, reason, first_check=first_check)

    def release(self, reason: str) -> None:
        """The agent took back its down: up again if the checks agree."""
        if self.checks_up and not self.server.healthy:
            self.bring_up(reason, ramp=self.pool.config.health.check != "none")

    def apply_weight(self) -> None:
        agent = self.server.agent
        percent = 100 if agent is None else agent.percent
        self.pool.set_effective_weight(self.server, self.server.weight * self.ramp * percent / 100)

    def _start_ramp(self) -> None:
        self._ramp_scope.cancel()
        duration = self.pool.config.health.slow_start
        self.ramp = slow_start_weight(1.0, 0.0, duration) if duration > 0 else 1.0
        self.apply_weight()
        if duration > 0:
            self._ramp_scope = trio.CancelScope()
            self._nursery.start_soon(self._ramp, duration, trio.current_time(), self._ramp_scope)

    async def _ramp(self, duration: float, start: float, scope: trio.CancelScope) -> None:
        """Raise the ramp step by step until the server has its whole weight."""
        with scope:
            while True:
                elapsed = trio.current_time() - start
                self.ramp = slow_start_weight(1.0, elapsed, duration)
                self.apply_weight()
                if elapsed >= duration:
                    return
                await trio.sleep_until(start + next_slow_start_step(elapsed, duration))


async def _probe_forever(health: ServerHealth, first: trio.Event) -> None:
    pool, server = health.pool, health.server
    config = pool.config.health
    state = Hysteresis(config.rise, config.fall)
    short = False  # in an episode of local shortage: logged once
    plan = plan_of(config)
    while True:
        if not server.sockaddrs:
            await _resolve(pool, server)
        try:
            ok, reason = await probe(server, config, plan, health_proxy_header(pool, server),
                                     pool.config.tls)  # fmt: skip
        except OutOfResources as exc:
            short = _skipped(pool, server, exc, short)
            first.set()
            await trio.sleep(config.interval)
            continue
        if short:
            short = False
            log.info("pool %s: server %s: health checks run again", pool.name, server.name)
        pool.record_check(server, ok, reason)
        health.checks_say(state, ok, reason, first_check=not first.is_set())
        first.set()
        await pool.held.pause(config.interval * random.uniform(1 - JITTER, 1 + JITTER))


def _skipped(pool: Pool, server: Server, exc: OutOfResources, short: bool) -> bool:
    """A check that ran short on our side: counted apart, logged once per episode, not held against it."""
    pool.record_check_skipped(server, exc.reason)
    if not short:
        log.error("pool %s: server %s: health check skipped: %s; not counted against the server",
                  pool.name, server.name, exc)  # fmt: skip
    return True


def health_proxy_header(pool: Pool, server: Server) -> bytes:
    """What a check sends first: nothing, unless `health.send_proxy` and the server gets a header."""
    if not pool.config.health.send_proxy:
        return b""
    version = server.send_proxy or pool.config.send_proxy
    return b"" if version == "none" else build_local(version)


async def _resolve(pool: Pool, server: Server) -> None:
    try:
        pool.set_addresses(server, await resolve_address(server.address))
    except OSError as exc:
        pool.record_check(server, False, f"cannot resolve {server.address.host!r}: {exc}")


async def _readmit_ejected(health: ServerHealth) -> None:
    """Without active checks, put an ejected server back after `eject_for` (not one its agent holds down)."""
    pool, server = health.pool, health.server
    while True:
        while server.healthy or health.held_down:
            await pool.wait_changed()
        await trio.sleep(pool.config.eject_for)
        if not server.healthy and not health.held_down:
            log.info("pool %s: retrying ejected server %s", pool.name, server.name)
            health.bring_up(f"retry after {pool.config.eject_for:g}s", ramp=False)
