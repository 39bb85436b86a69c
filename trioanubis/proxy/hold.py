"""Holding clients while no server can take them, instead of closing them.

Theory of operation: a pool with `queue_timeout > 0` owns a `HoldQueue`
(hold_queue.py), a line of clients in accept order. When connecting
(failover.py) finds no server to take a client (none up, all full, or every
attempt failed), `hold` puts the client in line instead of closing it.
Nothing is read from a held client: its bytes wait in the kernel until a
server is connected, so none is lost.

Only the head of the line is awake: the pool pokes it whenever something may
let it connect (a server came up, a connection ended and freed a slot,
weights changed: `Pool.changed` and `Pool.release` keep that contract); it
tries to connect (the normal pick → connect with failover), and when it
succeeds it leaves and hands the turn to the next, which tries at once. So
clients connect in accept order, one wake-up per change, whatever the length
of the line. A poke that arrives while the head is trying is not lost: the
head takes a fresh turn before each try, so the poke wakes it at once after.

A client leaves the line by connecting, after `queue_timeout` from its
accept (`queue_timeout`), when it has gone (`client_abort`, checked every
`GONE_CHECK`: closed or reset; with `abort_on_close`, the default, also a
client that sent its bytes and then FIN, since from here it cannot be told
from one that gave up and closed), when the
line was full (`max_queued`: `queue_full`, the newest arrival is the one
refused), or when its pool was removed by a reload (`no_server`). Its place
in line is the connection's to give back (lifecycle.py), on every exit.

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
    from trioanubis.proxy.lifecycle import Connection, EndState

log = logging.getLogger("trioanubis.hold")

# How often a held client checks whether it has gone: an abandoned client
# frees its place in line within a second, at one peek per second each.
GONE_CHECK: Final = 1.0

# One round of pick → connect: "" when connected, else why not.
Attempt = Callable[["Connection"], Awaitable["EndState | str"]]


async def hold(conn: Connection, attempt: Attempt) -> EndState | str:
    """Hold the client until `attempt` connects it (""), or say why it must be closed.

    `queue_full`, `queue_timeout`, `client_abort` or `no_server` (its pool is gone).
    """
    pool = conn.pool
    assert pool is not None
    queue = pool.held
    if not conn.join_line(queue, pool.config.max_queued):
        log.warning("pool %s: %d clients held already (max_queued); closing client %s",
                    pool.name, len(queue), conn.client)  # fmt: skip
        return "queue_full"
    if len(queue) == 1:
        log.warning("pool %s: no server can take client %s; holding it for up to %gs",
                    pool.name, conn.client, pool.config.queue_timeout)  # fmt: skip
    deadline = conn.started + pool.config.queue_timeout
    ticket = queue.ticket(conn)
    while True:
        with trio.move_on_at(min(deadline, trio.current_time() + GONE_CHECK)):
            await ticket.turn.wait()
        if ticket.evicted:
            log.warning("pool %s: max_queued clients held and client %s is the newest; closing it",
                        pool.name, conn.client)  # fmt: skip
            return "queue_full"
        if queue.closed:
            return "no_server"
        if trio.current_time() >= deadline:
            queue.timeouts += 1
            log.warning("pool %s: no server for client %s within queue_timeout %gs; closing it",
                        pool.name, conn.client, pool.config.queue_timeout)  # fmt: skip
            return "queue_timeout"
        if client_gone(conn.client_sock, fin_after_data=pool.config.abort_on_close,
                       read_early=bool(conn.early)):
            return "client_abort"
        if not ticket.turn.is_set():
            continue
        ticket.turn = trio.Event()  # a poke from now on wakes the next round
        if not queue.is_head(ticket):
            continue  # the turn went to a client accepted earlier, which joined meanwhile
        outcome = await attempt(conn)
        if not outcome:
            queue.served += 1
            conn.leave_line()
            return ""
        if outcome == "client_abort":
            return outcome
