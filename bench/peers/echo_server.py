"""An echo backend for the soak run: echoes every byte, EOF back after the client's EOF.

    python echo_server.py PORT
"""

from __future__ import annotations

import sys

import trio


async def echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


if __name__ == "__main__":
    trio.run(lambda: trio.serve_tcp(echo, int(sys.argv[1]), host="127.0.0.1"))
