"""An accepting backend that holds every connection open and never writes (idle-memory load).

    python hold_server.py PORT
"""

from __future__ import annotations

import resource
import selectors
import socket
import sys


def main(port: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    held: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                try:
                    while True:
                        conn, _ = listener.accept()
                        conn.setblocking(False)
                        held[conn.fileno()] = conn
                        selector.register(conn, selectors.EVENT_READ)
                except BlockingIOError:
                    pass
            else:
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(conn)
                    held.pop(conn.fileno(), None)
                    conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
