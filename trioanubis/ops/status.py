"""`anubis proxy`'s status: a live line on a terminal, plain log lines elsewhere.

Theory of operation: `run_status` samples the balancer (its `View`) every
`STATUS_INTERVAL` (servers up / total, clients held, connections accepted
per second) and `format_status` turns a `Sample` into one line (pure, so it
is tested without a terminal). On a terminal the line is redrawn in place
at the bottom of stderr, and `StatusHandler`, the log handler, clears it
before each log line and draws it again after, so log lines scroll above
it. When stderr is not a terminal (a file, a pipe, CI) nothing is redrawn:
a plain log line says the state each time servers or held clients change.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TextIO, final

import trio

if TYPE_CHECKING:
    from trioanubis.ops.view import View

log = logging.getLogger("trioanubis.status")

# Often enough to look live, rarely enough to cost nothing.
STATUS_INTERVAL: Final = 1.0
CLEAR_LINE: Final = "\r\x1b[K"


@dataclass(frozen=True, slots=True)
class Sample:
    up: int
    total: int
    held: int
    rate: float  # connections accepted per second since the last sample
    rolling: bool = False


def format_status(sample: Sample, width: int = 0) -> str:
    """One line: "servers 2/3 up · 0 held · 12.5 conn/s", cut to `width` columns if given."""
    line = f"servers {sample.up}/{sample.total} up · {sample.held} held · {sample.rate:.1f} conn/s"
    if sample.rolling:
        line += " · rolling restart"
    if width > 0 and len(line) > width - 1:
        line = line[: max(0, width - 2)] + "…"
    return line


def take_sample(view: View, accepted_before: int, seconds: float) -> tuple[Sample, int]:
    servers = [s for pool in view.pools.values() for s in pool.servers]
    accepted = sum(listener.accepted for listener in view.listeners.values())
    rate = (accepted - accepted_before) / seconds if seconds > 0 else 0.0
    sample = Sample(
        up=sum(s.state == "up" for s in servers),
        total=len(servers),
        held=sum(len(pool.held) for pool in view.pools.values()),
        rate=max(0.0, rate),
        rolling=any(s.rolling for s in view.spawners.values()),
    )
    return sample, accepted


@final
class StatusHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler for a terminal: log lines go above the status line, which stays at the bottom."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter | None) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.line:
            self.stream.write(CLEAR_LINE)
        super().emit(record)
        self.draw()

    def show(self, line: str) -> None:
        self.line = line
        self.stream.write(CLEAR_LINE)
        self.draw()

    def draw(self) -> None:
        if self.line:
            self.stream.write(self.line)
            self.flush()

    def close(self) -> None:
        if self.line:
            self.stream.write(CLEAR_LINE)
            self.line = ""
            self.flush()
        super().close()


def install_terminal_status(stream: TextIO = sys.stderr) -> StatusHandler | None:
    """On a terminal, replace the log handler by a `StatusHandler`; None when `stream` is not one."""
    if not stream.isatty():
        return None
    root = logging.getLogger("trioanubis")
    formatter = root.handlers[0].formatter if root.handlers else None
    handler = StatusHandler(stream, formatter)
    root.handlers[:] = [handler]
    return handler


async def run_status(view: View, terminal: StatusHandler | None) -> None:
    """Until cancelled: redraw the status line on a terminal, else log the state when it changes."""
    accepted = sum(listener.accepted for listener in view.listeners.values())
    last_state: tuple[int, int, int] | None = None
    then = trio.current_time()
    try:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            now = trio.current_time()
            sample, accepted = take_sample(view, accepted, now - then)
            then = now
            if terminal is not None:
                terminal.show(format_status(sample, _columns(terminal.stream)))
            elif (state := (sample.up, sample.total, sample.held)) != last_state:
                last_state = state
                log.info("status: %s", format_status(sample))
    finally:
        if terminal is not None:
            terminal.close()


def _columns(stream: TextIO) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0
