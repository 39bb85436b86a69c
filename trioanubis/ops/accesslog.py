"""Logging: the access log (one line per finished connection) and the log formats.

How a connection ended uses HAProxy-like termination states: `client_eof` /
`server_eof` (that side closed first, normally), `client_reset` /
`server_reset`, `idle_timeout`, `connect_failed` (every attempt failed),
`no_server` (nothing to try), `client_abort` (the client left while we were
connecting), `shutdown` (cut by a stop) and `drained` (finished normally while
the balancer was draining); with `queue_timeout`, `queue_timeout` (held that
long without a server) and `queue_full` (`max_queued` were held already).

Every log line goes to stderr through the `LogWriter` (logwriter.py), which
never makes the event loop wait and drops lines when stderr cannot keep up;
as text or, with `log_format = "json"`, as one JSON object per line (fatal
errors included, see `log_fatal`); access-log lines then carry their fields
as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, final

from trioanubis.ops.logwriter import LogWriter

if TYPE_CHECKING:
    from trioanubis.proxy.record import ConnectionRecord

log = logging.getLogger("trioanubis.access")


@final
class AccessLog:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.counts: dict[str, int] = {}  # termination state → connections

    def log(self, record: ConnectionRecord) -> None:
        end = record.end or "shutdown"
        self.counts[end] = self.counts.get(end, 0) + 1
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        duration = record.ended - record.started
        fields = {
            "listener": record.listener, "client": record.client, "server": record.server,
            "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
            "duration": round(duration, 6), "end": end,
        }  # fmt: skip
        log.info(
            "%s %s -> %s in=%d out=%d %.1fms %s", record.listener, record.client, record.server,
            record.bytes_in, record.bytes_out, duration * 1000, end, extra={"access": fields},
        )  # fmt: skip


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker  # with `workers = N`: which worker process wrote the line

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.worker is not None:
            data["worker"] = self.worker
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            data.update(access)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data)


# The process's one log writer, made by the first configure_logging (so nothing starts at import).
_writer: LogWriter | None = None


def configure_logging(level: str = "info", log_format: str = "text", worker: int | None = None) -> None:
    """Send every log line to stderr at `level`, as text or JSON lines, never blocking the caller.

    Called again (once the config says which format), it changes the format of
    the same writer, so lines already queued keep their order. A worker
    process passes its id, which every line then carries.
    """
    global _writer
    if _writer is None:
        _writer = LogWriter(_stderr_fd())
    if log_format == "json":
        _writer.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"worker {worker}: "
        formatter = logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)-7s {tag}%(message)s",
                                      "%Y-%m-%dT%H:%M:%S")  # fmt: skip
        formatter.converter = time.gmtime
        _writer.setFormatter(formatter)
    root = logging.getLogger("trioanubis")
    root.handlers[:] = [_writer]
    root.setLevel(level.upper())
    root.propagate = False


def _stderr_fd() -> int:
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by something without a descriptor
        return 2


def log_fatal(message: str) -> None:
    """Report the error that stops the process: `anubis: …` as text, an error object as JSON.

    It goes through the same writer as every other line, after them, and is
    written before exit (within the writer's flush bound).
    """
    writer = _writer
    if writer is None:
        print(f"anubis: {message}", file=sys.stderr)
    elif isinstance(writer.formatter, JsonFormatter):
        record = logging.LogRecord("trioanubis", logging.ERROR, __file__, 0, "%s", (message,), None)
        writer.put((writer.format(record) + "\n").encode("utf-8", "backslashreplace"), always=True)
    else:
        writer.put(f"anubis: {message}\n".encode("utf-8", "backslashreplace"), always=True)


def logs_json() -> bool:
    """True once log_format = "json" is in force."""
    return _writer is not None and isinstance(_writer.formatter, JsonFormatter)


def log_dropped() -> int:
    """Log lines dropped so far because stderr could not keep up (anubis_log_dropped_total)."""
    return 0 if _writer is None else _writer.dropped + _writer.lost
