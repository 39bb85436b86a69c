"""Holding clients while no server can take them, instead of closing them.

Theory of operation: a pool with `queue_timeout > 0` owns a `HoldQueue`, a
line of clients in arrival order. When the connection code finds no server
to take a client (none up, all full, or every attempt failed), `hold` puts
the client in line instead of closing it. Nothing is read from a held client:
its bytes wait in the kernel until a server is connected, so none is lost.

Only the head of the line is awake, parked on the pool's live view
(`Pool.wait_changed`: a server came up, a connection ended, weights
changed); everyone behind it waits on an event of its own. The head tries
to connect (the normal pick → connect with failover); when it succeeds it
leaves and hands the turn to the next, which tries at once. So clients
connect in arrival order, one wake-up per change, whatever the length of
the line, and a newcomer while the line is not empty joins its end rather
than overtaking it.

A client leaves the line by connecting, after `queue_timeout` from its
accept (`queue_timeout`), when it closes (`client_abort`, checked every
`GONE_CHECK`), or when the line is full on arrival (`max_queued`:
`queue_full`). Each is counted.

While clients are held the pool's health checks probe every `FAST_PROBE`
(`pause`) and the first passing check brings a server back, so a restarted
server takes its held clients within about `FAST_PROBE` of listening.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

import trio

from trioanubis.proxy.connect import client_gone

if TYPE_CHECKING:
    from trioanubis.hold_queue import Ticket
    from trioanubis.pool import Pool
    from trioanubis.proxy.record import ConnectionRecord
    from trioanubis.proxy.relay import Relay

log = logging.getLogger("trioanubis.hold")

# How often a held client checks whether it has gone: an abandoned client
# frees its place in line within a second, at one peek per second each.
GONE_CHECK: Final = 1.0


async def hold(
    pool: Pool, relay: Relay, record: ConnectionRecord, attempt: Callable[[], Awaitable[bool]]
) -> bool:
    """Hold the client until `attempt()` connects it (True) or it must be closed (False).

    `record.end` says why on False: `queue_full`, `queue_timeout`,
    `client_abort`. The client's place in line is given back in every case,
    cancellation included.
    """
    queue = pool.held
    if len(queue) >= pool.config.max_queued:
        queue.full += 1
        record.end = "queue_full"
        log.warning("pool %s: %d clients held already (max_queued); closing client %s",
                    pool.name, len(queue), record.client)  # fmt: skip
        return False
    deadline = record.started + pool.config.queue_timeout
    ticket = queue.join()
    if len(queue) == 1:
        log.warning("pool %s: no server can take client %s; holding it for up to %gs",
                    pool.name, record.client, pool.config.queue_timeout)  # fmt: skip
    try:
        return await _wait_and_try(pool, ticket, relay, record, deadline, attempt)
    finally:
        queue.leave(ticket)


async def _wait_and_try(
    pool: Pool,
    ticket: Ticket,
    relay: Relay,
    record: ConnectionRecord,
    deadline: float,
    attempt: Callable[[], Awaitable[bool]],
) -> bool:
    version = pool.version
    while True:
        woken = await _wait_turn(pool, ticket, deadline, version)
        if trio.current_time() >= deadline:
            pool.held.timeouts += 1
            record.end = "queue_timeout"
            log.warning("pool %s: no server for client %s within queue_timeout %gs; closing it",
                        pool.name, record.client, pool.config.queue_timeout)  # fmt: skip
            return False
        if client_gone(relay.client):
            record.end = "client_abort"
            return False
        if not woken:
            continue
        version = pool.version
        record.end = ""
        if await attempt():
            pool.held.served += 1
            return True
        if record_end(record) == "client_abort":  # `attempt` sets it
            return False


async def _wait_turn(pool: Pool, ticket: Ticket, deadline: float, version: int) -> bool:
    """Wait to be the head and for the pool to change; False if GONE_CHECK or the deadline came first."""
    with trio.move_on_at(min(deadline, trio.current_time() + GONE_CHECK)):
        if not ticket.turn.is_set():
            await ticket.turn.wait()
            return True  # the one before us connected (or left): try at once
        if pool.version == version:  # nothing changed since our last attempt
            await pool.wait_changed()
        return True
    return False


def record_end(record: ConnectionRecord) -> str:
    """How `record` ended so far (read through a call: the attempt that set it is opaque to mypy)."""
    return record.end
