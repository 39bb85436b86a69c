"""The etcd client against a hostile or broken server of our own: it gives up within its bounds.

Each stand-in reads the request and then misbehaves (garbage, endless headers,
endless bodies and lines, silence, a closed connection, deep JSON). Every
call must end in one EtcdError, promptly, without leaking a descriptor;
afterwards the same client still works against a server that behaves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import no_fd_leak
from trioanubis.cluster import (
    EtcdBadResponse,
    EtcdClient,
    EtcdError,
    EtcdRequestFailed,
    EtcdTimeout,
    EtcdUnreachable,
)
from trioanubis.cluster.http import MAX_HEAD
from trioanubis.cluster.watch import MAX_RESTARTS

Handler = Callable[[trio.SocketStream], Awaitable[object]]
CLOSE = object()  # what a handler returns to have the connection closed
LIMIT = 8192  # the client's max_response and max_watch_line here
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
CREATED = b'{"result":{"header":{"revision":"5"},"created":true}}\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(body: bytes) -> bytes:
    return OK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class StandIn:
    """A server on 127.0.0.1:0 that reads a request head, runs `handler`, and so on (keep-alive).

    A handler returns to wait for the next request on the connection, or sleeps forever to hold it;
    closing it (`then_close`) is its own return after setting `close`.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.sent = 0  # bytes the misbehaving handlers pushed, to show the client stopped reading
        self.connections = 0

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            received = b""
            while True:
                while b"\r\n\r\n" not in received:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    received += data
                received = received.split(b"\r\n\r\n", 1)[1]  # what follows is (mostly) the body
                if await self.handler(stream) is CLOSE:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def send_forever(self, stream: trio.SocketStream, first: bytes, each: bytes) -> None:
        await stream.send_all(first)
        while True:
            await stream.send_all(each)
            self.sent += len(each)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start(nursery: trio.Nursery, handler: Handler | None = None) -> StandIn:
    stand_in = StandIn(handler or reply(b""))
    listeners = await nursery.start(partial(trio.serve_tcp, stand_in._serve, 0, host="127.0.0.1"))
    stand_in.port = listeners[0].socket.getsockname()[1]
    return stand_in


def client_for(*endpoints: str, timeout: float = 1) -> EtcdClient:
    return EtcdClient(list(endpoints), timeout=timeout, max_response=LIMIT, max_watch_line=LIMIT)


def reply(data: bytes, *, then_close: bool = False) -> Handler:
    """Send `data` to each request (then close, or wait for the next request)."""

    async def handler(stream: trio.SocketStream) -> object:
        await stream.send_all(data)
        return CLOSE if then_close else None

    return handler


healthy = reply(answer(b'{"header":{"revision":"3"},"kvs":[{"key":"YQ==","value":"Yg=="}]}'))


async def outcome(call: Awaitable[object]) -> EtcdError | None:
    """The EtcdError the call raised (anything else fails the test), or None."""
    try:
        await call
    except EtcdError as exc:
        return exc
    return None


# --------------------------------------------------------------------------- unary calls

UNARY = [
    ("garbage", reply(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), EtcdBadResponse),
    ("html", reply(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n<html>hi</html>"), EtcdBadResponse),
    ("error body not etcd's", reply(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"),
     EtcdBadResponse),
    ("huge length", reply(OK_HEAD + b"Content-Length: 99999999999\r\n\r\n"), EtcdBadResponse),
    ("a length of 5000 digits", reply(OK_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n"),
     EtcdBadResponse),
    ("deep json", reply(answer(b"[" * 4000 + b"]" * 4000)), EtcdBadResponse),
    ("wrong types", reply(answer(b'{"header":{"revision":true},"kvs":"no"}')), EtcdBadResponse),
    ("silence", reply(b""), EtcdTimeout),
    ("half a head", reply(b"HTTP/1.1 200 OK\r\nContent-"), EtcdTimeout),
    ("half a body", reply(OK_HEAD + b"Content-Length: 100\r\n\r\n{"), EtcdTimeout),
    ("closed before answering", reply(b"", then_close=True), EtcdUnreachable),
    ("closed mid-body", reply(OK_HEAD + b"Content-Length: 100\r\n\r\n{", then_close=True), EtcdUnreachable),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("case", "handler", "expected"), UNARY, ids=[c[0] for c in UNARY])
async def test_a_broken_answer_is_one_etcd_error(case: str, handler: Handler, expected: type[EtcdError]
                                                 ) -> None:  # fmt: skip
    with no_fd_leak():  # measured outside the stand-in's nursery, which closes its own sockets
        async with trio.open_nursery() as nursery:
            stand_in = await start(nursery, handler)
            async with client_for(stand_in.endpoint) as client:
                with trio.fail_after(10):
                    assert isinstance(await outcome(client.get("a")), expected)
                    assert isinstance(await outcome(client.put("a", "b")), expected)
            nursery.cancel_scope.cancel()


ENDLESS = [
    ("endless header", b"HTTP/1.1 200 OK\r\nX-A: ", b"a" * 1024),
    ("endless headers", b"HTTP/1.1 200 OK\r\n", b"X-A: b\r\n" * 128),
    ("endless informational answers", b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 64),
    ("endless chunked body", CHUNKED, chunk(b"x" * 1024)),
    ("endless body until close", OK_HEAD + b"Connection: close\r\n\r\n", b"y" * 1024),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "first", "each"), ENDLESS, ids=[c[0] for c in ENDLESS])
async def test_an_endless_answer_is_refused_within_the_bounds(case: str, first: bytes, each: bytes) -> None:
    with no_fd_leak():
        async with trio.open_nursery() as nursery:
            stand_in = await start(nursery)
            stand_in.handler = lambda stream: stand_in.send_forever(stream, first, each)
            async with client_for(stand_in.endpoint) as client:
                with trio.fail_after(10):
                    assert isinstance(await outcome(client.get("a")), EtcdBadResponse)
            # The client stopped reading at its bound; what the server pushed past it sat in socket buffers.
            assert stand_in.sent < 4 * MAX_HEAD + LIMIT + 8 * 1024 * 1024
            nursery.cancel_scope.cancel()


async def test_after_hostile_servers_the_client_still_works_and_fails_over(nursery: trio.Nursery) -> None:
    garbage = await start(nursery, reply(b"\x00" * 100))
    closing = await start(nursery, reply(b"", then_close=True))
    good = await start(nursery, healthy)
    async with client_for(closing.endpoint, good.endpoint) as client:  # a read fails over past a closed one
        assert (await client.get("a")).kvs[0].value == b"b"
    async with client_for(garbage.endpoint, good.endpoint) as client:  # an answer that is bad is not retried
        with pytest.raises(EtcdBadResponse):
            await client.get("a")
    async with client_for(closing.endpoint, good.endpoint) as client:  # a write that may have run is not
        with pytest.raises(EtcdUnreachable, match="closed before an answer"):
            await client.put("a", "b")


# --------------------------------------------------------------------------- watches


def watch_stream(*parts: bytes, close: bool = False) -> Handler:
    async def handler(stream: trio.SocketStream) -> object:
        await stream.send_all(CHUNKED + b"".join(chunk(part) for part in parts))
        if close:
            await stream.send_all(b"0\r\n\r\n")
            return CLOSE
        await trio.sleep_forever()

    return handler


WATCHES = [
    ("no created line", watch_stream(), EtcdTimeout),
    ("garbage line", watch_stream(CREATED, b"not json\n"), EtcdBadResponse),
    ("line without newline", watch_stream(CREATED, b'{"result":' + b" " * (2 * LIMIT)), EtcdBadResponse),
    ("first line not created", watch_stream(b'{"result":{"header":{"revision":"5"}}}\n'), EtcdBadResponse),
    ("event of a bad type", watch_stream(CREATED, b'{"result":{"events":[{"type":7}]}}\n'), EtcdBadResponse),
    ("deep line", watch_stream(CREATED, b"[" * 100 + b"]" * 100 + b"\n"), EtcdBadResponse),
    ("stream error", watch_stream(CREATED, b'{"error":{"grpc_code":3,"message":"no"}}', close=True),
     EtcdRequestFailed),
    ("refused", reply(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 62\r\n\r\n"
                      b'{"error":"unexpected EOF","message":"unexpected EOF","code":2}'), EtcdError),
    ("ends after created, every time", watch_stream(CREATED, close=True), EtcdUnreachable),
    ("ends after created twice, every time", watch_stream(CREATED, CREATED, close=True), EtcdUnreachable),
    ("ends after stale progress, every time", watch_stream(CREATED, CREATED.replace(b',"created":true', b""),
                                                           close=True), EtcdUnreachable),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("case", "handler", "expected"), WATCHES, ids=[c[0] for c in WATCHES])
async def test_a_broken_watch_stream_is_one_etcd_error(case: str, handler: Handler, expected: type[EtcdError]
                                                       ) -> None:  # fmt: skip
    with no_fd_leak():
        async with trio.open_nursery() as nursery:
            stand_in = await start(nursery, handler)
            async with client_for(stand_in.endpoint) as client:
                with trio.fail_after(20), pytest.raises(expected):
                    async with client.watch("/p/", 1) as watch:
                        async for _ in watch:
                            pass  # pragma: no cover
            if case.startswith("ends after"):
                assert stand_in.connections == 1 + MAX_RESTARTS  # restarted, then gave up
            nursery.cancel_scope.cancel()


async def test_an_endless_watch_line_is_refused_at_its_limit(nursery: trio.Nursery) -> None:
    stand_in = await start(nursery)
    stand_in.handler = lambda stream: stand_in.send_forever(stream, CHUNKED + chunk(CREATED),
                                                            chunk(b"z" * 1024))  # fmt: skip
    async with client_for(stand_in.endpoint) as client:
        with trio.fail_after(10), pytest.raises(EtcdBadResponse, match=f"exceeds {LIMIT} bytes"):
            async for _ in client.watch("/p/", 1):
                pass  # pragma: no cover


# --------------------------------------------------------------------------- fuzz


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=200) | st.sampled_from([OK_HEAD, CHUNKED, chunk(CREATED), b"\r\n",
                                                            b"0\r\n\r\n", b"Content-Length: 5\r\n"]),
                max_size=6), st.booleans())  # fmt: skip
@example([b"HTTP/1.1 200 :\nTransfer-Encoding:chunked\n\n", b"0\r\n\n", b"\x00"], False)  # a stray byte
@example([CHUNKED, chunk(CREATED)], False)  # a watch that began and then says nothing
async def test_random_answers_raise_only_etcd_errors_and_the_client_still_works(
    parts: list[bytes], close: bool
) -> None:
    with no_fd_leak():
        async with trio.open_nursery() as nursery:
            fuzzed = await start(nursery, reply(b"".join(parts), then_close=close))
            async with client_for(fuzzed.endpoint, timeout=0.3) as client:
                with trio.fail_after(10):
                    await outcome(client.get("a"))
                    await outcome(client.txn([], []))
                    await outcome(client.keep_lease_alive(1))
                    watch = client.watch("/p/", 1)
                    async with watch:
                        # A stream that began ('created') and then says nothing is a quiet watch:
                        # it waits, as it would on etcd. Anything else ends it within the deadline.
                        with trio.move_on_after(1):
                            await outcome(watch.__anext__())
                fuzzed.handler = healthy  # the same client, once the server behaves, works
                assert (await client.get("a")).kvs[0].value == b"b"
            nursery.cancel_scope.cancel()
