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
"""

from __future__ import annotations

import logging
import random
from typing import Final

import trio

from trioanubis.errors import OutOfResources
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
            if pool.config.health.check == "none":
                first.set()
                await _readmit_ejected(pool, server)
            else:
                await _probe_forever(pool, server, first)
        finally:
            first.set()


async def _probe_forever(pool: Pool, server: Server, first: trio.Event) -> None:
    config = pool.config.health
    state = Hysteresis(config.rise, config.fall)
    short = False  # in an episode of local shortage: logged once
    plan = plan_of(config)
    async with trio.open_nursery() as ramps:
        ramp = trio.CancelScope()
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
            was_up = server.healthy
            now_up = state.observe(was_up, ok) or (ok and len(pool.held) > 0)  # clients wait: no rise
            if now_up and not was_up:
                ramp = _ramp_up(ramps, pool, server)
                pool.mark_up(server, reason)
            elif not now_up and (was_up or not first.is_set()):
                ramp.cancel()
                pool.mark_down(server, reason, first_check=not first.is_set())
            elif ok and len(pool.held):
                pool.changed()  # it answers while clients wait (a refused connect held them): retry
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


def _ramp_up(nursery: trio.Nursery, pool: Pool, server: Server) -> trio.CancelScope:
    scope = trio.CancelScope()
    duration = pool.config.health.slow_start
    if duration > 0:
        pool.set_effective_weight(server, slow_start_weight(server.weight, 0.0, duration))
        nursery.start_soon(_ramp, pool, server, duration, trio.current_time(), scope)
    else:
        pool.set_effective_weight(server, float(server.weight))
    return scope


async def _ramp(
    pool: Pool, server: Server, duration: float, start: float, scope: trio.CancelScope
) -> None:
    """Raise `server`'s effective weight step by step until it reaches its weight."""
    with scope:
        while True:
            elapsed = trio.current_time() - start
            pool.set_effective_weight(server, slow_start_weight(server.weight, elapsed, duration))
            if elapsed >= duration:
                return
            await trio.sleep_until(start + next_slow_start_step(elapsed, duration))


async def _readmit_ejected(pool: Pool, server: Server) -> None:
    """Without active checks, put an ejected server back after `eject_for`."""
    while True:
        while server.healthy:
            await pool.wait_changed()
        await trio.sleep(pool.config.eject_for)
        log.info("pool %s: retrying ejected server %s", pool.name, server.name)
        pool.mark_up(server, f"retry after {pool.config.eject_for:g}s")
