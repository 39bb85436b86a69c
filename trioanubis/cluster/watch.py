"""A watch: the changes under a key or prefix from a revision on, as an async iterator of `Event`s.

Theory of operation: a `Watch` owns one connection of its own (`Session.open_stream`,
TCP keepalive on) carrying one `/v3/watch` stream, and reads it line by line
(`reading.Lines`, each line at most `max_watch_line` bytes). It starts when first
iterated; etcd's first line says `created`, within the client's timeout.

`next_revision` is where a new watch would resume: the revision after the
last event handed out, or after the store's revision that a progress
notification reported (asked for, so that a quiet watch still moves on and a
resume after a long silence is not needlessly compacted). While further
events of the same revision (one txn) are still queued it stays at that
revision: resuming may repeat events of one revision, never skip one.

How a watch ends, each time closing its socket before the exception leaves:
- Compaction: `EtcdCompacted` with `compact_revision`. Read the keys again,
  then watch from that read's revision + 1.
- The stream broke, etcd said it is unavailable (a SIGTERM'd member sends
  that as its last line), or refused the token: the watch opens a new stream
  from `next_revision` by itself (any endpoint, token fetched again). After
  `MAX_RESTARTS` restarts in a row with no news in between (an event, or a
  progress notification that moves `next_revision`), or when no endpoint
  answers at all, the last error is raised.
- Cancellation, or `aclose()` (also what `async with` does on exit). A
  finished watch iterates no more: start a new one from `next_revision`.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType
from typing import Final, final

import trio

from trioanubis.cluster.answers import Event, WatchMessage, parse_watch_line
from trioanubis.cluster.calls import watch_call
from trioanubis.cluster.errors import EtcdBadResponse, EtcdTimeout, EtcdUnavailable, TokenRefused
from trioanubis.cluster.http import Broken, HttpConnection
from trioanubis.cluster.reading import Lines
from trioanubis.cluster.session import Session

# New streams in a row with nothing received beyond `created` before the watch gives up:
# enough to ride out a member stopping (the next endpoint takes over), few enough that a
# server which accepts and drops every stream cannot keep us reconnecting forever.
MAX_RESTARTS: Final = 3


@final
class Watch:
    """Iterate it (`async for event in watch`), preferably inside `async with` so it is closed on exit."""

    def __init__(self, session: Session, key: bytes, *, prefix: bool, start_revision: int) -> None:
        self.next_revision = start_revision
        self._session = session
        self._key = key
        self._prefix = prefix
        self._what = watch_call(key, prefix=prefix, start_revision=0).what
        self._events: deque[Event] = deque()
        self._conn: HttpConnection | None = None
        self._token: str | None = None
        self._lines = Lines(session.limits.max_watch_line, self._what)
        self._ended = False  # the current stream's body has ended
        self._restarts = 0
        self._closed = False

    def __aiter__(self) -> Watch:
        return self

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:  # fmt: skip
        await self.aclose()

    async def aclose(self) -> None:
        """Close the stream's socket; the watch yields nothing more."""
        self._close()
        await trio.lowlevel.checkpoint()

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        try:
            while not self._events:
                await self._receive()
        except BaseException:
            self._close()
            raise
        return self._pop()

    def _pop(self) -> Event:
        event = self._events.popleft()
        more_of_it = bool(self._events) and self._events[0].mod_revision == event.mod_revision
        self.next_revision = max(self.next_revision, event.mod_revision + (0 if more_of_it else 1))
        return event

    async def _receive(self) -> None:
        """Take the next message of the stream, (re)starting the stream first if there is none."""
        try:
            if self._conn is None:
                await self._start()
            else:
                self._take(await self._next_message())
        except (Broken, EtcdUnavailable, TokenRefused) as exc:
            self._drop()
            if isinstance(exc, TokenRefused):
                self._session.forget(self._token)
            self._restarts += 1
            if self._restarts > MAX_RESTARTS:
                raise

    def _take(self, message: WatchMessage) -> None:
        """Queue the events; only news (events, a progress notification that moves on) resets `_restarts`."""
        if message.events:
            self._events.extend(message.events)
            self._restarts = 0
        elif not message.created and message.revision + 1 > self.next_revision:
            self.next_revision = message.revision + 1  # a progress notification: all up to it was sent
            self._restarts = 0

    async def _start(self) -> None:
        call = watch_call(self._key, prefix=self._prefix, start_revision=self.next_revision)
        self._conn, self._token = await self._session.open_stream(call)
        self._lines, self._ended = Lines(self._session.limits.max_watch_line, self._what), False
        timeout = self._session.limits.timeout
        with trio.move_on_after(timeout):
            first = await self._next_message()
            if not first.created:
                raise EtcdBadResponse(f"{self._where()}: the stream did not begin with 'created'")
            if self.next_revision == 0:  # from now on: resume after the revision it started at
                self.next_revision = first.revision + 1
            return
        raise EtcdTimeout(f"{self._where()}: no 'created' within {timeout:g} s")

    async def _next_message(self) -> WatchMessage:
        assert self._conn is not None
        while True:
            line = self._lines.next_line()
            if line is not None:
                return parse_watch_line(line, self._where())
            if self._ended:
                raise Broken(f"{self._where()}: etcd ended the stream")
            data = await self._conn.receive_data(self._what)
            if data is not None:
                self._lines.feed(data)
                continue
            self._ended = True
            rest = self._lines.rest()  # a stream's last line (an error) may lack its newline
            if rest:
                return parse_watch_line(rest, self._where())

    def _where(self) -> str:
        return f"{self._what} on {self._conn.endpoint}" if self._conn is not None else self._what

    def _close(self) -> None:
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        """Close the current stream's socket (synchronous: nothing can interrupt it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
