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
goes out under one FIFO lock, in the order OpenSSL produced it, and each
task takes only what its own call produced: a receive never waits behind
the transport for the sender's records (two relays' TLS ends doing that
to each other deadlocked).

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
        self._send_lock = trio.StrictFIFOLock()  # whatever OpenSSL wrote goes out in order
        self._eof_sent = False
        self._closed = False
        self._receiving = False  # one receive_some at a time (Trio's stream contract)
        self._sending = False  # one send_all / send_eof at a time

    async def _flush(self, *, then_eof: bool = False) -> None:
        """Send what the last SSL call wrote, after whatever an earlier call wrote.

        The bytes are taken out of OpenSSL's buffer at once, before any wait,
        so each task sends only what its own call made: a receive never
        carries (and never waits behind the transport for) the sender's
        records. The lock is FIFO, so the transport gets them in the order
        OpenSSL made them; `then_eof` shuts the transport's writing after them
        under the same lock (no send beside it).
        """
        data = self._outgoing.read()
        if data or then_eof:
            async with self._send_lock:
                if data:
                    await self.transport.send_all(data)
                if then_eof and isinstance(self.transport, trio.abc.HalfCloseableStream):
                    await self.transport.send_eof()

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

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` decrypted bytes; b"" after close_notify. BrokenResourceError otherwise."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an integer")
            raise ValueError("max_bytes must be at least 1")
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            data = await self._receive(max_bytes or RECEIVE_SIZE)
        finally:
            self._receiving = False
        return data

    async def _receive(self, size: int) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
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
                if self._outgoing.pending and not self._eof_sent:  # e.g. an answer to a key update
                    await self._flush()
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if self._outgoing.pending and not self._eof_sent:
                await self._flush()
            await self._feed()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called")
        self._sending = True
        try:
            if data:
                try:
                    self.ssl.write(data)
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(f"TLS: {describe_ssl_error(exc)}") from exc
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._flush()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """close_notify, then EOF on the transport; receiving goes on."""
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        self._sending = True
        try:
            try:
                self.ssl.unwrap()
            except ssl.SSLWantReadError:
                pass  # the peer's close_notify has not come yet: fine, we only close our side
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {describe_ssl_error(exc)}") from exc
            await self._flush(then_eof=True)
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Close the transport at once (no close_notify: the relay sends that as EOF when due)."""
        self._closed = True
        await self.transport.aclose()
