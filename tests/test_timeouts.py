"""The Timer (timeouts.py) under Trio's MockClock: each deadline fires within its stated bound.

The bound the README gives: a timeout fires at most a tenth of its value
late (connect: one tick, idle and half-close: two ticks, the tick being a
twentieth of the shortest timeout). The connect waits go through each
readiness backend, since the Timer cancels an attempt through it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.conftest import standalone_connection
from tests.helpers import BACKENDS, fill, running, socket_pair
from trioanubis.errors import AttemptCancelled
from trioanubis.proxy.connect import Connecting
from trioanubis.proxy.io import Readiness, open_readiness
from trioanubis.proxy.lifecycle import Connection, Flow
from trioanubis.proxy.timeouts import Timer, tick_for

LATE = 0.1  # the most a timeout may fire late, as a fraction of its value


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def timing(backend_name: str, *timeouts: float) -> AsyncIterator[tuple[Timer, Readiness]]:
    async with running(backend_name) as backend:
        timer = Timer(tick_for(timeouts))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run)
            yield timer, backend
            nursery.cancel_scope.cancel()


class Stoppable(Flow[object]):
    """A relay that moves nothing: the connection's `end_with` cancels its scope."""

    __slots__ = ("scope",)

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.scope = trio.CancelScope()

    def stop(self) -> None:
        self.over = True
        self.scope.cancel()


def relaying(client: socket.socket, backend: Readiness, idle: float, half_close: float) -> Stoppable:
    conn = standalone_connection(backend, client, idle=idle, half_close=half_close)
    relay = Stoppable(conn)
    conn.relay = relay
    relay.last_activity = trio.current_time()
    return relay


@asynccontextmanager
async def idle_relay(
    backend_name: str, idle: float, half_close: float
) -> AsyncIterator[tuple[Timer, Stoppable]]:
    """A relaying connection with no traffic, watched by a running Timer; unwatched at the end."""
    with socket_pair("tcp") as (client, _):
        async with timing(backend_name, idle, half_close) as (timer, backend):
            relay = relaying(client, backend, idle=idle, half_close=half_close)
            timer.watch(relay.conn)
            yield timer, relay
            timer.unwatch(relay.conn)


async def ended_at(relay: Stoppable) -> float:
    with relay.scope:
        await trio.sleep_forever()
    return trio.current_time()


async def test_idle_timeout_fires_within_its_bound(
    backend_name: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with idle_relay(backend_name, 30.0, 60.0) as (_, relay):
        start = trio.current_time()
        fired = await ended_at(relay)
        assert relay.conn.end == "idle_timeout"
        assert 30.0 <= fired - start <= 30.0 * (1 + LATE)


@pytest.mark.slow
async def test_activity_postpones_the_idle_timeout(
    backend_name: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with idle_relay(backend_name, 10.0, 60.0) as (_, relay):
        last = 0.0
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                nonlocal last
                for _ in range(12):  # a byte every 4 s for 48 s: never idle for 10 s
                    await trio.sleep(4.0)
                    relay.active = True
                    last = trio.current_time()

            nursery.start_soon(trickle)
            fired = await ended_at(relay)
        assert relay.conn.end == "idle_timeout"
        assert 10.0 <= fired - last <= 10.0 * (1 + LATE) + 1e-9


@pytest.mark.slow
async def test_half_close_timeout_fires_within_its_bound_after_the_first_eof(
    backend_name: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with idle_relay(backend_name, 600.0, 20.0) as (_, relay):
        await trio.sleep(333.3)  # long after start, between two of the Timer's looks
        relay.first_eof = "client_eof"  # what Relay._on_eof does
        relay.active = True
        eof = trio.current_time()
        fired = await ended_at(relay)
        assert relay.conn.end == "idle_timeout"
        assert 20.0 <= fired - eof <= 20.0 * (1 + LATE) + 1e-9


async def attempt(connecting: Connecting, sock: socket.socket) -> float:
    """Park as a connect attempt does (connect_any); when the Timer stopped it."""
    connecting.fd = sock.fileno()
    with pytest.raises(AttemptCancelled):
        await connecting.poller.wait_writable(sock.fileno())
    return trio.current_time()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["connect", "failover"])
async def test_connect_and_failover_deadlines_fire_within_their_bound(
    backend_name: str, which: str, autojump_clock: trio.testing.MockClock
) -> None:
    connect_timeout, failover_timeout = (5.0, 0.0) if which == "connect" else (30.0, 7.0)
    with socket_pair("tcp") as (pending, _), socket_pair("tcp") as (client, _peer):
        async with timing(backend_name, connect_timeout, failover_timeout, 600.0) as (timer, backend):
            conn = relaying(client, backend, idle=600.0, half_close=60.0).conn
            conn.relay = None
            backend.register(pending.fileno())
            fill(pending)  # never writable: a connect that does not finish
            start = trio.current_time()
            connecting = conn.connecting = Connecting(backend)
            connecting.started = start
            deadline = start + failover_timeout if failover_timeout else float("inf")
            connecting.deadline = min(start + connect_timeout, deadline)  # as failover._attempt
            timer.watch(conn)
            fired = await attempt(connecting, pending)
            bound = min(connect_timeout, failover_timeout or connect_timeout)
            assert connecting.end == "timeout"
            assert bound <= fired - start <= bound * (1 + LATE)
            timer.unwatch(conn)


@pytest.mark.slow
async def test_client_leaving_cancels_the_connect_attempt_within_a_tick(
    backend_name: str, autojump_clock: trio.testing.MockClock
) -> None:
    with socket_pair("tcp") as (pending, _), socket_pair("tcp") as (client, peer):
        async with timing(backend_name, 10.0, 600.0) as (timer, backend):
            conn = relaying(client, backend, idle=600.0, half_close=60.0).conn
            conn.relay = None
            backend.register(pending.fileno())
            fill(pending)
            connecting = conn.connecting = Connecting(backend)
            connecting.started = trio.current_time()
            connecting.deadline = connecting.started + 10.0
            timer.watch(conn)
            async with trio.open_nursery() as nursery:

                async def leave() -> None:
                    await trio.sleep(2.0)
                    peer.close()

                nursery.start_soon(leave)
                fired = await attempt(connecting, pending)
            assert connecting.end == "client_abort"
            assert 2.0 <= fired - connecting.started <= 2.0 + 2 * timer.tick
            timer.unwatch(conn)


async def test_an_idle_relay_is_looked_at_once_per_twentieth_of_its_timeout_not_every_tick() -> None:
    with socket_pair("tcp") as (client, _):
        timer = Timer(0.1)
        relay = relaying(client, open_readiness("portable"), idle=600.0, half_close=60.0)
        timer.watch(relay.conn)
        looks = 0
        for tick in range(600):  # a minute of ticks
            relay.active = True  # each look turns the mark back into False
            timer.check(tick * 0.1)
            looks += not relay.active
        assert relay.conn.end == ""
        # 60 s / 20 = a look every 3 s, 30 ticks: 20 looks a minute, not 600.
        assert 20 <= looks <= 22
