"""What a finished connection leaves behind: the record the access log and the counters read.

Theory of operation: every connection that had a task ends by handing
itself to its listener's sink (`RecordSink`: the access log's `log`) once it
has closed (lifecycle.py's `Connection.close`); the sink reads it through
`Record` (lifecycle.py), a protocol of plain values, and never changes it. How it ended is
one of `END_STATES`, decided in lifecycle.py and nowhere else.
`ConnectionRecord` is the same record as a plain frozen value, for what
builds records without a connection (tests, a worker's summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, final

from trioanubis.proxy.lifecycle import END_STATES, EndState, Record, RecordSink

__all__ = ["END_STATES", "ConnectionRecord", "EndState", "Record", "RecordSink"]


@final
@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A finished connection's record as plain values."""

    listener: str
    peer: tuple[object, ...]  # the client's address
    server: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = 0.0
    ended: float = 0.0
    end: EndState | Literal[""] = ""

    @property
    def client(self) -> str:
        host = str(self.peer[0])
        return f"[{host}]:{self.peer[1]}" if ":" in host else f"{host}:{self.peer[1]}"
