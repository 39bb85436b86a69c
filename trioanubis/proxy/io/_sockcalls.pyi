import _socket

def recv_into(sock: _socket.socket, fd: int, buffer: memoryview, /) -> int: ...
def send(sock: _socket.socket, fd: int, buffer: memoryview, count: int, /) -> int: ...
def connect_inet(
    sock: _socket.socket, fd: int, sockaddr: tuple[object, ...], delay_ack: bool, at_once: bool, /
) -> int: ...
def epoll_ctl(epfd: int, op: int, fd: int, events: int, /) -> None: ...  # Linux only
def epoll_ready(epfd: int, maxevents: int, /) -> list[int]: ...  # Linux only
def accept_inet(fd: int, /) -> tuple[int, tuple[str, int]] | None: ...  # Linux only
def listen_backlog(sock: _socket.socket, fd: int, /) -> int: ...  # Linux only
