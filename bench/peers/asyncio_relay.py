"""A minimal asyncio TCP relay, written the way an asyncio user would write one.

    python asyncio_relay.py [--uvloop] LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]

Round robin over the backends on 127.0.0.1; half-close forwarded with write_eof.
"""

from __future__ import annotations

import asyncio
import itertools
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def main(listen: int, backends: list[int]) -> None:
    ports = itertools.cycle(backends)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", next(ports))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        server_writer.close()
        client_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--uvloop":
        import uvloop

        uvloop.install()
        args = args[1:]
    asyncio.run(main(int(args[0]), [int(p) for p in args[1:]]))
