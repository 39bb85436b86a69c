"""A connection's record and the names of the ways it can end: one module owns the lifecycle's words.

Theory of operation: every finished connection leaves one `ConnectionRecord`,
which the listener stamps and counts and the access log writes. Why it ended
is one of `END_STATES` (`EndState`), and nothing else: the relay, the connect
path, the Timer, the listener and the access log all name end states through
this type, so mypy --strict catches a misspelt one anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, final, get_args

# How a connection ended (the access log's `end`, the counters' keys).
EndState = Literal[
    "client_eof",  # the client sent EOF first, then the server: a normal end
    "server_eof",  # the server sent EOF first, then the client: a normal end
    "drained",  # ended normally while the balancer was draining
    "client_reset",  # the client reset or failed
    "server_reset",  # the server reset or failed
    "idle_timeout",  # no byte either way for idle_timeout (or half_close_timeout)
    "client_abort",  # the client left while we were still connecting
    "connect_failed",  # every attempt to connect failed
    "no_server",  # no server could take the connection
    "queue_full",  # no server could take it and max_queued clients were held already
    "queue_timeout",  # held for queue_timeout and no server could take it
    "fault_reset",  # an injected fault (reset_after) reset it on purpose
    "fault_close",  # an injected fault (close_after) closed it on purpose, with FIN
    "internal_error",  # a bug ended this connection (logged with its traceback)
    "shutdown",  # cut by the balancer stopping
]
END_STATES: Final = get_args(EndState)
# Ends after which both sockets close with FIN: both sides finished, nothing was
# relayed, or an injected close_after asked for exactly that. Every other end (a
# peer's reset, idle or half-close timeout, a stop, a bug, fault_reset) resets
# both sides, so no peer takes a cut for a complete transfer.
CLOSED_CLEANLY: Final[frozenset[EndState]] = frozenset(
    {"client_eof", "server_eof", "connect_failed", "no_server", "client_abort", "queue_full", "queue_timeout",
     "fault_close"}
)
# The side that sent EOF first, while the other still sends.
FirstEof = Literal["", "client_eof", "server_eof"]
# Why the Timer cancelled a connect attempt ("" while it has not).
AttemptEnd = Literal["", "timeout", "client_abort"]


@final
@dataclass(slots=True)
class ConnectionRecord:
    """What the access log and the counters learn about one finished connection."""

    listener: str
    peer: tuple[object, ...]  # the client's address, as accept() gave it
    server: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = 0.0
    ended: float = 0.0  # stamped once, when the listener accounts for it
    end: EndState | Literal[""] = ""

    @property
    def client(self) -> str:
        """The client as host:port, formatted when needed (most connections are never logged)."""
        host = str(self.peer[0])
        return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"


# Where a listener hands each ended connection's record (the access log's `log`).
RecordSink = Callable[[ConnectionRecord], None]
