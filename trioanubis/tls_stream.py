"""A TLS stream over a Trio stream, with half-close: close_notify is EOF, both ways.

Theory of operation: `TlsStream` drives an `ssl.SSLObject` over two memory
BIOs, like `trio.SSLStream`, with what a layer-4 relay needs and
`trio.SSLStream` lacks: `send_eof` sends close_notify and shuts down writing
on the transport while the other direction keeps flowing (TLS 1.3 allows it,
RFC 8446 §6.1), and a close_notify received reads as EOF. A transport that
ends without close_notify reads as EOF too, as HAProxy, nginx and Trio's
`https_compatible` treat it: real servers (nginx answering an HTTP/1.0
request that arrived with a close_notify) close that way, and the
application protocol above knows its own message lengths.

Backpressure and memory: a receive reads at most `RECEIVE_SIZE` bytes from
the transport, only when OpenSSL needs more to return a record; a send
encrypts one chunk and waits until the transport took all of it. So one
direction holds at most one chunk in each BIO. One task may receive while
another sends (the relay's two pumps): whatever either makes OpenSSL write
goes out under one lock, in the order OpenSSL produced it.

Errors: `TlsError` (with a short reason) for a failed handshake; after the
handshake, any TLS or transport failure is `trio.BrokenResourceError`.
Closing the transport is the owner's job (the connection closes its sockets).
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Final, final

import trio

from trioanubis.errors import AnubisError

# Transport bytes read per receive: a maximal TLS record and its overhead.
RECEIVE_SIZE: Final = 16384 + 2048


class TlsError(AnubisError):
    """A TLS handshake failed; `reason` is short, for logs and health state."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def describe_ssl_error(exc: BaseException) -> str:
    """A short reason: "certificate verify failed: certificate has expired", "wrong version number", …"""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    return type(exc).__name__


@final
class TlsStream(trio.abc.HalfCloseableStream):
    """TLS over `transport`; call `do_handshake` first."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        received: bytes = b"",
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if received:  # bytes already read from the transport (a ClientHello read for routing)
            self._incoming.write(received)
        self.ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                    server_hostname=server_hostname)  # fmt: skip
        self._send_lock = trio.StrictFIFOLock()
        self._eof_sent = False

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.transport.send_all(data)

    async def _feed(self) -> None:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """Complete the handshake; TlsError with the reason when it fails (the caller closes)."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ssl.CertificateError) as exc:
                await self._flush_quietly()  # the alert, so the peer learns why
                reason = describe_ssl_error(exc)
                raise TlsError(f"TLS handshake: {reason}", reason) from exc
            try:
                await self._flush()
                await self._feed()
            except (trio.BrokenResourceError, OSError) as exc:
                raise TlsError("TLS handshake: the connection failed", "reset") from exc
        try:
            await self._flush()
        except (trio.BrokenResourceError, OSError) as exc:
            raise TlsError("TLS handshake: the connection failed", "reset") from exc

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` decrypted bytes; b"" after close_notify. BrokenResourceError otherwise."""
        size = max_bytes or RECEIVE_SIZE
        while True:
            try:
                data = self.ssl.read(size)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or EOF without one
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {describe_ssl_error(exc)}") from exc
            else:
                if self._outgoing.pending:  # e.g. an answer to a key update
                    await self._flush()
                return data
            if self._outgoing.pending:
                await self._flush()
            await self._feed()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called")
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {describe_ssl_error(exc)}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """close_notify, then EOF on the transport; receiving goes on."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify has not come yet: fine, we only close our side
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {describe_ssl_error(exc)}") from exc
        await self._flush()
        if isinstance(self.transport, trio.abc.HalfCloseableStream):
            await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()
