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
errors included, see `log_fatal`) whose `time` is RFC 3339 in UTC to the
millisecond; access-log lines then carry their fields as keys.

The access log is on the data path (one line per connection), so it skips
`logging` when it can: while the writer alone receives `trioanubis.access`
lines (what `configure_logging` sets up), `AccessLog.log` renders the line
with the formatter's `format_access` (the very line `logging` would have
written, with no LogRecord: about a microsecond for either format) and hands
the text to the writer with `LogWriter.put_text`. Rendering here costs less
than on the writer thread: there, each batch of lines needs the GIL back from
the event loop, and the loop then waits for it (measured at about 10,000
connections/s: 2.7 µs of CPU per connection in all against 4.9 for rendering
on the writer thread). A formatter of someone else's gets an `AccessLine`,
rendered on the writer thread through a LogRecord (`LogWriter.defer`).
Anything else listening (a test's caplog, a handler added later) gets the
line through `logging`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps's own (C when it can)
from typing import TYPE_CHECKING, Final, final

from trioanubis.ops.logwriter import LogWriter

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Record as ConnectionRecord

log = logging.getLogger("trioanubis.access")
# The logger whose handlers receive access lines (access lines propagate to it).
_root = logging.getLogger("trioanubis")

ACCESS_MESSAGE: Final = "%s %s -> %s in=%d out=%d %.1fms %s"
DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%S"


@final
class AccessLog:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.counts: dict[str, int] = {}  # termination state → connections

    def log(self, record: ConnectionRecord) -> None:
        """Count how `record` ended and, when enabled, log its line (never blocks)."""
        end = record.end or "shutdown"
        self.counts[end] = self.counts.get(end, 0) + 1
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        writer = _sole_writer()
        if writer is not None:
            formatter = writer.formatter
            if isinstance(formatter, (TextFormatter, JsonFormatter)):
                writer.put_text(formatter.format_access(record, time.time()))
            else:
                writer.defer(AccessLine(record, time.time(), formatter))
            return
        log.info(ACCESS_MESSAGE, *message_args(record), extra={"access": access_fields(record)})


def message_args(record: ConnectionRecord) -> tuple[object, ...]:
    """The arguments of an access line's ACCESS_MESSAGE."""
    return (record.listener, record.client, record.server, record.bytes_in, record.bytes_out,
            (record.ended - record.started) * 1000, record.end or "shutdown")  # fmt: skip


def access_fields(record: ConnectionRecord) -> dict[str, object]:
    """An access line's fields: its JSON keys (and a LogRecord's `access` attribute)."""
    return {
        "listener": record.listener, "client": record.client, "server": record.server,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "duration": round(record.ended - record.started, 6), "end": record.end or "shutdown",
    }  # fmt: skip


def _sole_writer() -> LogWriter | None:
    """The writer, while it is the only thing an access line reaches (so it may skip `logging`)."""
    writer, handlers = _writer, _root.handlers
    if writer is None or len(handlers) != 1 or handlers[0] is not writer or _root.propagate:
        return None
    if log.handlers or log.filters or _root.filters or writer.filters or writer.level > logging.INFO:
        return None
    return writer


@final
class AccessLine:
    """An access line not formatted yet: the writer thread renders it, as `logging` would have."""

    __slots__ = ("created", "formatter", "record")

    def __init__(self, record: ConnectionRecord, created: float, formatter: logging.Formatter | None) -> None:
        self.record = record  # finished: nobody changes it any more
        self.created = created  # when it was logged, as LogRecord.created
        self.formatter = formatter  # the one in force when it was logged

    def render(self) -> str:
        formatter = self.formatter
        if isinstance(formatter, (TextFormatter, JsonFormatter)):
            return formatter.format_access(self.record, self.created)
        return (formatter or logging.Formatter()).format(self.log_record())

    def log_record(self) -> logging.LogRecord:
        """The LogRecord `logging` would have made for this line."""
        record = logging.LogRecord(log.name, logging.INFO, __file__, 0, ACCESS_MESSAGE,
                                   message_args(self.record), None, "log")  # fmt: skip
        record.created, record.msecs = self.created, _msecs(self.created)
        record.relativeCreated = (self.created - logging._startTime) * 1000  # type: ignore[attr-defined]
        record.access = access_fields(self.record)
        return record


def _msecs(created: float) -> float:
    """LogRecord.msecs of a record created at `created` (as Python 3.10–3.12 compute it)."""
    return int((created - int(created)) * 1000) + 0.0


@final
class Stamps:
    """Times as "2026-11-22T01:41:21.071" (UTC): the date and the time to the second formatted once
    per second, the milliseconds as one integer. Log lines come in time order, so the cache of one
    second almost always hits; the (second, text) tuple is replaced in one store, so the event loop
    and the writer thread may both use it."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = (-1, "")

    def millis(self, created: float) -> str:
        second, stamp = self._last
        if int(created) != second:
            second = int(created)
            stamp = time.strftime(DATE_FORMAT, time.gmtime(second))
            self._last = (second, stamp)
        return f"{stamp}.{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """The text format: `time level [worker N: ]message`, UTC, to the millisecond."""

    def __init__(self, worker: int | None = None) -> None:
        self.tag = "" if worker is None else f"worker {worker}: "
        super().__init__(f"%(asctime)s.%(msecs)03d %(levelname)-7s {self.tag}%(message)s", DATE_FORMAT)
        self.converter = time.gmtime
        self.stamps = Stamps()

    def format_access(self, record: ConnectionRecord, created: float) -> str:
        """`format` of the access line of `record` logged at `created`, without a LogRecord."""
        # ACCESS_MESSAGE's fields, spelt out in one f-string (%s of a str and %d of an int
        # write what these do); test_logging checks the line against logging's, byte for byte.
        return (
            f"{self.stamps.millis(created)} INFO    {self.tag}{record.listener} "
            f"{record.client} -> {record.server} in={int.__repr__(record.bytes_in)} "
            f"out={int.__repr__(record.bytes_out)} {(record.ended - record.started) * 1000:.1f}ms "
            f"{record.end or 'shutdown'}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `time` is RFC 3339 in UTC to the millisecond
    ("2026-11-22T01:41:21.071Z"), what log shippers parse without being told a format."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker  # with `workers = N`: which worker process wrote the line
        self.stamps = Stamps()

    def timestamp(self, created: float) -> str:
        """`created` (seconds since the epoch) as RFC 3339 in UTC with milliseconds."""
        return self.stamps.millis(created) + "Z"

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": self.timestamp(record.created),
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

    def format_access(self, record: ConnectionRecord, created: float) -> str:
        """`format` of the access line of `record` logged at `created`, without a LogRecord.

        Spelt out rather than `json.dumps` of a dict (a third of the time):
        the same keys in the same order, the same separators, strings escaped
        by json's own encoder, numbers written as json writes them.
        """
        worker = "" if self.worker is None else f', "worker": {self.worker!r}'
        return (
            f'{{"time": "{self.stamps.millis(created)}Z", "level": "info", '
            f'"logger": {_ACCESS_LOGGER}{worker}, '
            f'"listener": {_json_string(record.listener)}, "client": {_json_string(record.client)}, '
            f'"server": {_json_string(record.server)}, "bytes_in": {int.__repr__(record.bytes_in)}, '
            f'"bytes_out": {int.__repr__(record.bytes_out)}, '
            f'"duration": {_json_float(round(record.ended - record.started, 6))}, '
            f'"end": {_json_string(record.end or "shutdown")}}}'
        )


_ACCESS_LOGGER: Final = _json_string(log.name)


def _json_float(value: float) -> str:
    """A float as `json.dumps` writes it."""
    if math.isfinite(value):
        return float.__repr__(value)
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


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
    _writer.setFormatter(JsonFormatter(worker) if log_format == "json" else TextFormatter(worker))
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
