"""How a call reaches etcd: the endpoints in order, the kept connection, the auth token.

Theory of operation: `Session.call` sends one unary call and returns the body
of etcd's 200 answer; `Session.open_stream` does the same for a streaming call
(a watch) on a connection of its own, handed to the caller once the answer's
head says 200. Both go through one loop (`_any`) over the endpoints:

- The endpoints are tried in order, starting with the one that last
  answered, so a dead first endpoint costs one failed connect, not one per
  call. Failing to connect (`Unsent`) always moves on to the next. A
  connection that broke, a timeout, or an "unavailable" answer (no leader,
  leader changed) moves on only for calls that are safe to run twice (reads,
  keep-alives, watches: `Call.retry_safe`); for a write it is raised, since
  the write may have been applied. When every endpoint failed, the error
  (`EtcdUnreachable`, or `EtcdTimeout` if one took the request and was
  silent) lists each endpoint's reason.
- Each attempt on one endpoint (connect, send, the whole answer) is bounded
  by `timeout`; a call may so take up to one `timeout` per endpoint.
- Unary calls share kept-alive connections: one finishes, its connection
  goes back to the idle list (at most `IDLE_KEPT`), the next call on the
  same endpoint takes it if it is still fresh. A call that fails or is
  cancelled closes its connection, whose state is then unknown.
- Each connection has one owner at every moment: the call using it, or the
  idle list. What takes from or closes the idle list does so without a
  checkpoint (`HttpConnection.close` is synchronous), so no other task
  sees the list half-changed, and a close that is cancelled (a fleet
  stopping closes its client in a cancelled scope) still closes every
  connection it took.
- With a username, the token comes from `/v3/auth/authenticate` before the
  first call (one task authenticates, the others wait on the lock) and rides
  in the `Authorization` header. When etcd refuses it (a simple token
  expires after `--auth-token-ttl`, 5 minutes unused by default; a password
  change drops the user's tokens; a role change makes them "old"), the token
  is forgotten, fetched again, and the call sent once more: a refused call
  was not run. (A restart does not drop tokens: etcd 3.4 replays them from
  its log.)
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar, final

import trio

from trioanubis.cluster.answers import error_from, parse_token
from trioanubis.cluster.calls import Call, authenticate_call
from trioanubis.cluster.errors import EtcdError, EtcdTimeout, EtcdUnavailable, EtcdUnreachable, TokenRefused
from trioanubis.cluster.http import Broken, Endpoint, HttpConnection, Unsent

# Idle kept-alive connections: one serves callers taking turns; a second spares a new connect
# when two tasks overlap now and then (a keep-alive loop and a read).
IDLE_KEPT: Final = 2

T = TypeVar("T")
Attempt = Callable[[Endpoint, Call, "str | None"], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class Limits:
    timeout: float
    max_response: int
    max_watch_line: int


def _headers(token: str | None) -> list[tuple[str, str]]:
    return [("Authorization", token)] if token else []


@final
class Session:
    """The shared part of one client: endpoints, kept connections, token. See the module docstring."""

    def __init__(self, endpoints: Sequence[Endpoint], context: ssl.SSLContext | None,
                 credentials: tuple[str, str] | None, limits: Limits) -> None:  # fmt: skip
        self.endpoints = tuple(endpoints)
        self.limits = limits
        self._context = context
        self._credentials = credentials
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self._idle: list[HttpConnection] = []
        self._current = 0
        self._closed = False

    async def aclose(self) -> None:
        """Close the idle connections (all, even when cancelled); calls after this work but keep none."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await trio.lowlevel.checkpoint()

    async def call(self, call: Call) -> tuple[bytes, str]:
        """The body of etcd's 200 answer to a unary `call`, and the endpoint that gave it."""
        return await self._authorised(call, self._exchange)

    async def open_stream(self, call: Call) -> tuple[HttpConnection, str | None]:
        """A connection of its own on which `call` was answered 200, the body still to read; and the token."""
        return await self._authorised(call, self._start_stream)

    async def _authorised(self, call: Call, attempt: Attempt[T]) -> T:
        token = await self.token()
        try:
            return await self._any(call, attempt, token)
        except TokenRefused:
            if self._credentials is None:
                raise
            self.forget(token)
            return await self._any(call, attempt, await self.token())

    async def token(self) -> str | None:
        """The auth token to send (authenticating first if there is none yet); None without a username."""
        if self._credentials is None:
            return None
        async with self._auth_lock:
            if self._token is None:
                body, where = await self._any(authenticate_call(*self._credentials), self._exchange, None)
                self._token = parse_token(body, f"authenticate on {where}")
            return self._token

    def forget(self, token: str | None) -> None:
        """Drop a token etcd refused (unless another task has already replaced it)."""
        if token is not None and self._token == token:
            self._token = None

    def _order(self) -> list[int]:
        count = len(self.endpoints)
        return [(self._current + step) % count for step in range(count)]

    async def _any(self, call: Call, attempt: Attempt[T], token: str | None) -> T:
        failures: list[str] = []
        late = False
        for index in self._order():
            endpoint = self.endpoints[index]
            try:
                result = await attempt(endpoint, call, token)
            except Unsent as exc:
                failures.append(str(exc))
                continue
            except (Broken, EtcdTimeout, EtcdUnavailable) as exc:
                if not call.retry_safe:
                    raise
                late = late or isinstance(exc, EtcdTimeout)
                failures.append(str(exc).removeprefix(f"{call.what} on "))
                continue
            except EtcdError:
                self._current = index  # it answered: start there next time
                raise
            self._current = index
            return result
        kind = EtcdTimeout if late else EtcdUnreachable
        raise kind(f"{call.what}: no etcd endpoint answered: {'; '.join(failures)}")

    async def _exchange(self, endpoint: Endpoint, call: Call, token: str | None) -> tuple[bytes, str]:
        deadline = trio.current_time() + self.limits.timeout
        conn = self._take_idle(endpoint) or await self._connect(endpoint, deadline)
        reusable = False
        try:
            with trio.move_on_at(deadline):
                await conn.send(call, _headers(token))
                status, length = await conn.receive_head(call.what)
                body = await conn.receive_body(call.what, self.limits.max_response, length)
                reusable = conn.finish_cycle()
                if status != 200:
                    raise error_from(status, body, f"{call.what} on {endpoint}")
                return body, str(endpoint)
            raise EtcdTimeout(f"{call.what} on {endpoint}: no answer within {self.limits.timeout:g} s")
        finally:
            self._release(conn, reusable)

    async def _start_stream(self, endpoint: Endpoint, call: Call, token: str | None
                            ) -> tuple[HttpConnection, str | None]:  # fmt: skip
        deadline = trio.current_time() + self.limits.timeout
        conn = await self._connect(endpoint, deadline, keep_alive=True)
        try:
            with trio.move_on_at(deadline):
                await conn.send(call, _headers(token))
                status, length = await conn.receive_head(call.what)
                if status == 200:
                    return conn, token
                body = await conn.receive_body(call.what, self.limits.max_response, length)
                raise error_from(status, body, f"{call.what} on {endpoint}")
            raise EtcdTimeout(f"{call.what} on {endpoint}: no answer within {self.limits.timeout:g} s")
        except BaseException:
            conn.close()
            raise

    async def _connect(self, endpoint: Endpoint, deadline: float, *, keep_alive: bool = False
                       ) -> HttpConnection:  # fmt: skip
        with trio.move_on_at(deadline):
            return await HttpConnection.open(endpoint, self._context, keep_alive=keep_alive)
        raise Unsent(f"{endpoint}: no connection within {self.limits.timeout:g} s")

    def _take_idle(self, endpoint: Endpoint) -> HttpConnection | None:
        """A kept connection to `endpoint` that can carry a request; stale ones are closed on the way.

        No checkpoint, so no other task takes from the list meanwhile (with one per stale connection
        closed, two tasks could list the same connections, and the second `remove` raised ValueError)."""
        for conn in [c for c in self._idle if c.endpoint == endpoint]:
            fresh = conn.fresh()  # before the list lets go of it: it stays owned if this raises
            self._idle.remove(conn)
            if fresh:
                return conn
            conn.close()
        return None

    def _release(self, conn: HttpConnection, reusable: bool) -> None:
        """Keep `conn` for the next call, or close it; the oldest kept beyond `IDLE_KEPT` is closed."""
        if not reusable or self._closed:
            conn.close()
            return
        self._idle.append(conn)
        if len(self._idle) > IDLE_KEPT:
            self._idle.pop(0).close()
