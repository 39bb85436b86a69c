"""Logging: the access log (one line per finished connection) and the log formats.

How a connection ended uses HAProxy-like termination states: `client_eof` /
`server_eof` (that side closed first, normally), `client_reset` /
`server_reset`, `idle_timeout`, `connect_failed` (every attempt failed),
`no_server` (nothing to try), `client_abort` (the client left while we were
connecting), `shutdown` (cut by a stop) and `drained` (finished normally while
the balancer was draining); with `queue_timeout`, `queue_timeout` (held that
long without a server) and `queue_full` (`max_queued` were held already).

Every log line goes to stderr, as text or, with `log_format = "json"`, as one
JSON object per line; access-log lines then carry their fields as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from trioanubis.connection import ConnectionRecord

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
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            data.update(access)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Send every log line to stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")  # fmt: skip
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("trioanubis")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
