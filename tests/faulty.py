"""A fault-injecting test backend, scripted per connection (toxiproxy-style).

Each accepted connection takes the next `Script` from the backend's queue (or
its default) and behaves as it says: speak first, echo, delay or slice its
writes, close or reset after N bytes, half-close and keep reading, accept and
go silent, stop reading until told, delay its close. A reader task feeds a
writer task through a one-slot channel, so a backend that cannot write also
stops reading (it applies backpressure like a real server). What each
connection received is kept so tests can compare bytes.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import trio

from tests.conftest import reset

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@dataclass
class Script:
    banner: bytes = b""  # sent first, before reading anything
    half_close_after_banner: bool = False  # send EOF after the banner, keep reading
    echo: bool = True  # send back what arrives; EOF back after the client's EOF
    chunk_delay: float = 0.0  # sleep before each write
    slice_writes: bool = False  # write in random 1–16 byte pieces
    close_after: int | None = None  # close normally once this many bytes were sent
    reset_after: int | None = None  # reset (SO_LINGER 0) once this many bytes were sent
    silent: bool = False  # accept, then neither read nor write
    stop_reading: trio.Event | None = None  # read nothing until this is set
    close_delay: float = 0.0  # wait this long before closing at the end
    linger_after_eof: bool = False  # after the client's EOF, keep the connection open forever
    stream_bytes: bytes = b""  # sent after the banner, concurrently with reading
    seed: int = 0


@dataclass
class Connection:
    received: bytearray = field(default_factory=bytearray)
    sent: int = 0
    saw_eof: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)
    reset: bool = False


class _Stop(Exception):
    """The script ended the connection (closed or reset after N bytes)."""


class FaultyBackend:
    def __init__(self, default: Script | None = None) -> None:
        self.default = default or Script()
        self.queue: list[Script] = []
        self.connections: list[Connection] = []
        self.port = 0
        self.scope = trio.CancelScope()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[FaultyBackend] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        script = self.queue.pop(0) if self.queue else self.default
        conn = Connection()
        self.connections.append(conn)
        try:
            if script.silent:
                await trio.sleep_forever()
            send, receive = trio.open_memory_channel[bytes](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_all, stream, script, conn, receive, random.Random(script.seed))
                async with send:
                    if script.stop_reading is not None:
                        await script.stop_reading.wait()
                    while data := await stream.receive_some(65536):
                        conn.received += data
                        if script.echo:
                            await send.send(data)
                    conn.saw_eof.set()
                if script.linger_after_eof:
                    await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Stop):
            pass
        except BaseExceptionGroup as group:
            if not group.subgroup((_Stop, trio.BrokenResourceError, trio.ClosedResourceError)):
                raise
        finally:
            if script.close_delay:
                with trio.CancelScope(shield=True):
                    await trio.sleep(script.close_delay)
            if not conn.reset:
                await stream.aclose()
            conn.closed.set()

    async def _write_all(
        self,
        stream: trio.SocketStream,
        script: Script,
        conn: Connection,
        echoes: trio.MemoryReceiveChannel[bytes],
        rng: random.Random,
    ) -> None:
        await self._write(stream, script, conn, script.banner, rng)
        if script.half_close_after_banner:
            await stream.send_eof()
            async for _ in echoes:
                pass
            return
        await self._write(stream, script, conn, script.stream_bytes, rng)
        async for data in echoes:
            await self._write(stream, script, conn, data, rng)
        if script.echo:
            await stream.send_eof()

    async def _write(
        self, stream: trio.SocketStream, script: Script, conn: Connection, data: bytes, rng: random.Random
    ) -> None:
        limit = script.close_after if script.close_after is not None else script.reset_after
        if limit is not None:
            data = data[: max(0, limit - conn.sent)]
        view = memoryview(data)
        while view:
            if script.chunk_delay:
                await trio.sleep(script.chunk_delay)
            size = rng.randint(1, 16) if script.slice_writes else len(view)
            await stream.send_all(view[:size])
            conn.sent += len(view[:size])
            view = view[size:]
        if limit is not None and conn.sent >= limit:
            if script.reset_after is not None:
                conn.reset = True
                reset(stream)
            else:
                await stream.aclose()
            raise _Stop


async def start_faulty(nursery: trio.Nursery, default: Script | None = None) -> FaultyBackend:
    backend = FaultyBackend(default)
    await nursery.start(backend.run)
    return backend
