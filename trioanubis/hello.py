"""A tiny hello-world HTTP backend for the demo (`anubis hello`, `anubis demo`).

Answers every path with `hello from NAME` and `/health` with `up`, with
HTTP/1.1 keep-alive, spoken through h11 (`200 OK`: h11 sends no reason phrase
unless given one, and some clients show the empty one). `anubis hello` binds
127.0.0.1 unless told otherwise, like any development server. It exists so the demo and the
container example need no third-party server.
"""

from __future__ import annotations

import logging
from typing import Final

import h11
import trio

from trioanubis.config import Address
from trioanubis.errors import AnubisError

log = logging.getLogger("trioanubis.hello")

MAX_REQUEST_HEAD: Final = 16384


async def serve_hello(
    name: str,
    bind: Address,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve hello-world HTTP on `bind` until cancelled."""
    try:
        listeners = await trio.open_tcp_listeners(bind.port, host=bind.host or None)
    except OSError as exc:
        raise AnubisError(f"hello backend {name}: binding {bind}: {exc.strerror or exc}") from None
    host, port = listeners[0].socket.getsockname()[:2]
    log.info("hello backend %s listening on %s:%d", name, host, port)
    task_status.started(Address(host, port))

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, name)

    await trio.serve_listeners(handler, listeners)


async def _serve_one(stream: trio.SocketStream, name: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    body = b"up\n" if event.target == b"/health" else f"hello from {name}\n".encode()
                    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
                    data = conn.send(h11.Response(status_code=200, reason=b"OK", headers=headers))
                    await stream.send_all(data + conn.send(h11.Data(data=body)) +
                                          conn.send(h11.EndOfMessage()))  # fmt: skip
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
    except (h11.RemoteProtocolError, h11.LocalProtocolError, trio.BrokenResourceError, OSError):
        return
