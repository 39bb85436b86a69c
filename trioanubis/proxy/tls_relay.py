"""The relay for a connection where either side speaks TLS: two pumps over Trio streams.

Theory of operation: the raw-socket relay (relay.py, with the poller's
inline steps and splice) moves plain bytes between two sockets; a TLS side
needs its bytes decrypted and encrypted, so a connection with TLS on either
side (a terminating listener, an originating pool) is relayed here instead,
chosen once per connection by connection.py. Both sides are Trio streams:
a `TlsStream` (tls_stream.py) or a `trio.SocketStream` over the plain socket.
The connection's `Relay` still holds the state the rest of the balancer
reads (bytes each way, `end`, `first_eof`, the Timer's `active` mark and the
nursery's cancel scope), so timeouts, /stats and the access log work alike.

Each pump receives one chunk (at most `CHUNK_SIZE`), then sends it whole
before receiving again: backpressure, and at most one chunk held per
direction besides one TLS record in each BIO. EOF (close_notify, or FIN on
a plain side) becomes `send_eof` on the other side (close_notify, or
shutdown(SHUT_WR)) and the other direction keeps flowing; a reset or a TLS
error ends the relay, named after the side that failed, and the connection
resets both sockets.

Sockets that joined the relay's poller (a server socket joins it to
connect) leave it first (`Poller.unregister`): Trio waits on them now.
Before the connection closes them, `release_sockets` tells Trio
(notify_closing).

`ServerTls.originate` is the TLS handshake with a server, run by
connect_with_failover right after the TCP connect, within the attempt's
deadline: a handshake or certificate failure is a `ConnectFailed` with the
reason, so it fails over and counts towards passive ejection like a refused
connect.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, final

import trio

from trioanubis.config import TlsClient
from trioanubis.errors import ConnectFailed
from trioanubis.proxy.relay import CHUNK_SIZE
from trioanubis.tls.stream import TlsError, TlsStream

if TYPE_CHECKING:
    from trioanubis.pool import Server
    from trioanubis.proxy.relay import Relay

_PUMP_TASK_NAME = "trioanubis.tls_relay.server_to_client"
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def socket_stream(sock: socket.socket) -> trio.SocketStream:
    """A Trio stream over a connection's plain socket (the connection keeps owning the socket)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def release_sockets(*socks: socket.socket | None) -> None:
    """Tell Trio the sockets are about to be closed (nothing waits on them by then)."""
    for sock in socks:
        if sock is not None and sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)


@final
class ServerTls:
    """TLS towards one connection's server: the handshake, then its stream."""

    def __init__(self, config: TlsClient) -> None:
        self.config = config
        self.stream: TlsStream | None = None

    async def originate(self, relay: Relay, server: Server) -> None:
        """Handshake over `relay.server`, just connected; ConnectFailed with the reason if it fails."""
        sock = relay.server
        assert sock is not None
        relay.poller.unregister(sock.fileno())
        hostname = self.config.sni or server.address.host
        stream = TlsStream(socket_stream(sock), self.config.context, server_side=False,
                           server_hostname=hostname)  # fmt: skip
        deadline = relay.connecting.deadline if relay.connecting is not None else float("inf")
        with trio.move_on_at(deadline) as scope:
            try:
                await stream.do_handshake()
            except TlsError as exc:
                raise ConnectFailed(f"connecting to {server.address}: {exc}", exc.reason) from None
        if scope.cancelled_caught:
            raise ConnectFailed(f"connecting to {server.address}: TLS handshake timeout", "timeout")
        self.stream = stream


async def relay_streams(relay: Relay, client: trio.abc.HalfCloseableStream,
                        server: trio.abc.HalfCloseableStream) -> None:  # fmt: skip
    """Relay until both sides sent EOF or one failed (or the Timer or a stop ends it)."""
    async with trio.open_nursery() as nursery:
        relay.scope = nursery.cancel_scope
        nursery.start_soon(_pump, relay, server, client, False, name=_PUMP_TASK_NAME)
        await _pump(relay, client, server, True)


def _failed(relay: Relay, client_side: bool) -> None:
    relay.finish("client_reset" if client_side else "server_reset")


async def _pump(relay: Relay, src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                upstream: bool) -> None:  # fmt: skip
    while True:
        try:
            data = await src.receive_some(CHUNK_SIZE)
        except _STREAM_ERRORS:
            _failed(relay, client_side=upstream)
            return
        if not data:
            await _on_eof(relay, dst, upstream)
            return
        relay.active = True
        if upstream:
            relay.bytes_in += len(data)
            if not relay.first_sent:
                relay.first_sent = relay.poller.now()
        else:
            if not relay.bytes_out and relay.first_sent:
                _record_first_byte(relay)
            relay.bytes_out += len(data)
        try:
            await dst.send_all(data)
        except _STREAM_ERRORS:
            _failed(relay, client_side=not upstream)
            return


async def _on_eof(relay: Relay, dst: trio.abc.HalfCloseableStream, upstream: bool) -> None:
    both = bool(relay.first_eof)
    if not both:
        relay.first_eof = "client_eof" if upstream else "server_eof"
    relay.active = True
    try:
        await dst.send_eof()
    except _STREAM_ERRORS:
        _failed(relay, client_side=not upstream)
        return
    if both:
        relay.end = relay.first_eof


def _record_first_byte(relay: Relay) -> None:
    pool, server = relay.pool, relay.server_record
    if pool is not None and server is not None and pool.config.least_time == "first_byte":
        pool.record_time(server, relay.poller.now() - relay.first_sent)
