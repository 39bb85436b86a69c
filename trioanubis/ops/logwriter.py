"""The log writer: log lines leave the process without the event loop ever waiting for them.

Theory of operation: `LogWriter` is the logging handler every trioanubis
logger ends in. `emit`, on whichever thread logs (almost always the event
loop's), formats the record and puts the encoded line on a queue, unless the
bytes queued and not yet written would pass `MAX_QUEUED_BYTES`: then the line
is dropped and counted (`dropped`; with the lines a vanished sink refused,
`lost`, exported as `anubis_log_dropped_total`).
A hot caller (the access log, once per connection) may skip `logging`: it
renders its own line and queues it with `put_text`, or `defer`s an object
that knows how to render itself, which the writer thread formats (the
access log does that only for a formatter not its own: rendering on the
writer thread needs the GIL back from the event loop for every batch, which
costs the loop more than rendering there). A deferred line counts
`DEFERRED_BYTES` against the limit until it is written, whatever its
rendered length.
One daemon thread, started with the first line, takes lines off the queue and
writes them to the descriptor with plain blocking `os.write`. Woken by a line
after it had caught up, it first lingers `LINGER` seconds, so that a burst
(an access line per connection) costs one wake-up and one write, not one of
each per line: the event loop's `put` then finds nobody to wake. A sink that
stalls (a pipe nobody reads, a frozen container log driver) stalls only that
thread; the data path never waits for it. Once the thread has caught up
(queue empty) after drops, it writes one line saying how many were dropped.

Why a thread, not a non-blocking descriptor written from a Trio task:
stderr's open file description is shared with the parent process and, under
`2>&1`, with our own stdout, so O_NONBLOCK set on it would leak into both (a
shell's terminal left non-blocking, `print` raising BlockingIOError); a pipe
or terminal that is "writable" may still block a write bigger than its free
space; and the log must work before and after `trio.run` (start-up errors,
the last lines at exit), where no Trio task runs. The thread writes with
`os.write`, never through `sys.stderr`, so it holds no lock the interpreter
needs at exit.

Exit: `flush` waits until everything queued is written, for at most
`FLUSH_TIMEOUT`; `logging.shutdown` (run at interpreter exit) calls it, so a
stalled sink delays exit by that much and never hangs it. Lines still queued
then are lost with the daemon thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Final, Protocol, final

# Bytes queued but not yet written, at most: about 2,500 access-log lines, a
# burst several times a pipe's 64 KiB, yet a bounded cost when the sink stalls.
MAX_QUEUED_BYTES: Final = 256 * 1024
# How long exit waits for queued lines to reach a slow sink.
FLUSH_TIMEOUT: Final = 2.0
# The most one write system call carries (several lines joined).
BATCH_BYTES: Final = 65536
# How long the writer thread lets lines gather after it was woken: at most
# this much later on the sink, and at 10,000 lines/s about 100 lines (19 KiB,
# well under MAX_QUEUED_BYTES) per wake-up and per write.
LINGER: Final = 0.01
# What a deferred line counts against MAX_QUEUED_BYTES: about an access-log
# line's length (text 100–150 bytes, JSON 180–250), so the bound stays near
# the same number of lines whether they are queued rendered or deferred.
DEFERRED_BYTES: Final = 192

# What `close` queues to end the thread (no line is empty: each ends with "\n").
_STOP: Final = b""

DROPPED_MESSAGE: Final = "dropped %d log lines: the log output could not keep up"


class Deferred(Protocol):
    """A log line queued unformatted: the writer thread renders it (without its newline)."""

    def render(self) -> str: ...


@final
class LogWriter(logging.Handler):
    """A logging handler that queues lines for one writer thread and drops them when it lags."""

    def __init__(self, fd: int, *, limit: int = MAX_QUEUED_BYTES) -> None:
        super().__init__()
        self.fd = fd
        self.limit = limit
        self.dropped = 0  # lines dropped since start because the queue was full
        self.lost = 0  # lines the sink refused (it went away) or failed to render; only the thread changes it
        self._reported = 0  # of those, the ones a "dropped N log lines" line has reported
        self._queued = 0  # bytes ever queued (changed under the handler's lock: emit, defer)
        self._written = 0  # bytes ever taken off the queue and written (only the thread changes it)
        self._queue: queue.SimpleQueue[bytes | Deferred] = queue.SimpleQueue()
        self._idle = threading.Condition()  # notified whenever the thread has caught up
        self._thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        self.put(line)

    def put(self, line: bytes, *, always: bool = False) -> None:
        """Queue one encoded line, or count it as dropped when the queue is full. Never blocks.

        `always` queues it even then (the one line saying why the process stops).
        """
        if not always and self._queued - self._written + len(line) > self.limit:
            self.dropped += 1
            return
        self._queued += len(line)
        self._queue.put(line)
        if self._thread is None:
            self._start()

    def put_text(self, text: str) -> None:
        """Queue one line of text (without its newline), as `emit` would, without a LogRecord.

        For a hot caller that renders its own line (the access log); takes the
        handler's lock as `handle` does around `emit`.
        """
        line = (text + "\n").encode("utf-8", "backslashreplace")
        self.acquire()
        try:
            self.put(line)
        finally:
            self.release()

    def defer(self, line: Deferred) -> None:
        """Queue a line the writer thread will format, or count it as dropped when the queue is full.

        Never blocks, and costs the caller one queue put: no LogRecord, no formatting.
        """
        self.acquire()  # as `handle` does around `emit`: another thread may log meanwhile
        try:
            if self._queued - self._written + DEFERRED_BYTES > self.limit:
                self.dropped += 1
                return
            self._queued += DEFERRED_BYTES
            self._queue.put(line)
            if self._thread is None:
                self._start()
        finally:
            self.release()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait until every queued line is written, for at most `timeout` seconds."""
        self.drain(timeout)

    def close(self) -> None:
        """Let the thread end once it has written what is queued (it is a daemon either way)."""
        if self._thread is not None:
            self._queue.put(_STOP)
        super().close()

    def drain(self, timeout: float) -> bool:
        """True once every queued line is written; False when `timeout` ran out first."""
        if self._thread is None:
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._written >= self._queued, timeout)

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="trioanubis-log-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # at interpreter exit no thread can start: nobody waits on us any more
            item = self._queue.get()
            line = self._render(item)
            if line is not None:
                self._write(line)
            self._written += _size(item)
            return
        self._thread = thread

    def _run(self) -> None:
        take, take_now = self._queue.get, self._queue.get_nowait
        caught_up = True
        while True:
            batch = [take()]
            if caught_up and batch[0] is not _STOP:
                time.sleep(LINGER)  # more lines come in a burst: gather them
            size = _size(batch[0])
            while size < BATCH_BYTES and batch[-1] is not _STOP:
                try:
                    item = take_now()
                except queue.Empty:
                    break
                batch.append(item)
                size += _size(item)
            stop = batch[-1] is _STOP
            lines = [line for item in batch if (line := self._render(item)) is not None]
            if not self._write(b"".join(lines)):
                self.lost += len(lines) - stop
            caught_up = self._queue.empty()
            if caught_up:
                self._report_drops()
            self._written += size  # after the report, so `drain` waits for that line too
            if caught_up:
                with self._idle:
                    self._idle.notify_all()
            if stop:
                return

    def _render(self, item: bytes | Deferred) -> bytes | None:
        """The encoded line of a queued item; None (counted as lost) when a deferred one fails to render."""
        if isinstance(item, bytes):
            return item
        try:
            return (item.render() + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # a formatter bug must not end the writer: the line is lost, and counted
            self.lost += 1
            return None

    def _report_drops(self) -> None:
        missed = self.dropped - self._reported
        if missed <= 0:
            return
        self._reported += missed
        record = logging.LogRecord("trioanubis.log", logging.WARNING, __file__, 0, DROPPED_MESSAGE,
                                   (missed,), None)  # fmt: skip
        try:
            self._write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:  # a formatter bug must not end the writer
            self._write(f"{DROPPED_MESSAGE % missed}\n".encode())

    def _write(self, data: bytes) -> bool:
        """Write all of `data` (blocking, on the writer thread); False when the sink is gone."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except InterruptedError:
                continue
            except OSError:  # the reader went away (EPIPE) or the descriptor is gone
                return False
        return True


def _size(item: bytes | Deferred) -> int:
    """What a queued item counts against the limit (the same when queued and when written)."""
    return len(item) if isinstance(item, bytes) else DEFERRED_BYTES
