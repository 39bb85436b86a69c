"""`anubis toxiproxy`: Toxiproxy 2.x's HTTP API, served on a balancer, for toxiproxy's clients unchanged.

Theory of operation: `serve_toxiproxy` runs a `Balancer` with no listener
of its own and an admin endpoint on the API's address whose router is
`ToxiproxyApi.route`, so the HTTP shell (h11, bounded requests, the Host
and cross-origin screening against DNS rebinding, the slot limits) is the
admin's; the proxies are `Proxies` (proxies.py) and their toxics `ToxicSet`s
(toxics.py).

The routes, JSON shapes, status codes and error bodies are toxiproxy's
(api.go at 2.12): errors are `{"error": MESSAGE, "status": CODE}` as text
(Go's `http.Error`), a created proxy is 201 and a created toxic 200,
deletions and `/reset` are 204, `/populate` answers 201 with `{"proxies":
[...]}` or the error's status with the error's fields beside what was
done, an unknown path is 404 "404 page not found" and a known path with
another method 405, and a browser's User-Agent ("Mozilla/...") is 403.

    GET    /version                          {"version": "..."}
    POST   /reset                            enable every proxy, remove every toxic
    GET    /proxies                          name → proxy with its toxics
    POST   /proxies                          create {"name", "listen", "upstream", "enabled"}
    POST   /populate                         create or replace a list of proxies
    GET    /proxies/{proxy}                  one proxy
    POST   /proxies/{proxy}  (PATCH too)     change listen, upstream, enabled
    DELETE /proxies/{proxy}
    GET    /proxies/{proxy}/toxics           its toxics
    POST   /proxies/{proxy}/toxics           add {"name", "type", "stream", "toxicity", "attributes"}
    GET    /proxies/{proxy}/toxics/{toxic}
    POST   /proxies/{proxy}/toxics/{toxic}   (PATCH too) change attributes, toxicity
    DELETE /proxies/{proxy}/toxics/{toxic}

Known differences: a request body is at most 4 KiB (the admin shell's
bound: about 30 proxies in one `/populate`); an `upstream` that is not
"host:port" is refused with 400 when the proxy is made (toxiproxy takes it
and fails each dial); attributes must be integers from 0 (toxiproxy takes
negative numbers); `/metrics` is not served.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, final
from urllib.parse import unquote

import trio

from trioanubis import __version__
from trioanubis.app import Balancer, run_until_signalled
from trioanubis.config import Address, AdminConfig, Config, Settings, ip_address_or_none
from trioanubis.ops.admin import Reply, json_depth
from trioanubis.testing.proxies import BindRecorder, Proxies, Proxy
from trioanubis.testing.toxics import ApiError, parse_toxic

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8474  # toxiproxy's
# The toxiproxy release whose API this follows; clients that look at /version see it first.
API_VERSION: Final = "2.12.0"
VERSION: Final = f"{API_VERSION}+trioanubis.{__version__}"
JSON: Final = "application/json"
ERROR_TYPE: Final = "text/plain; charset=utf-8"  # Go's http.Error
MAX_DEPTH: Final = 8

Handler = Callable[[list[str], str, bytes], Awaitable[Reply]]


def reply(status: int, document: Any) -> Reply:
    return Reply(status, JSON, json.dumps(document, separators=(",", ":")).encode())


def error(exc: ApiError) -> Reply:
    body = json.dumps({"error": exc.message, "status": exc.status}, separators=(",", ":"))
    return Reply(exc.status, ERROR_TYPE, body.encode() + b"\n")


def decode(body: bytes) -> object:
    """A JSON body, or ApiError 400 "bad request body: ..." (Go's decoder says EOF for an empty one)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise ApiError("bad request body: invalid UTF-8", 400) from None
    if not text.strip():
        raise ApiError("bad request body: EOF", 400)
    if json_depth(text) > MAX_DEPTH:
        raise ApiError(f"bad request body: nested more than {MAX_DEPTH} levels deep", 400)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ApiError(f"bad request body: {exc}", 400) from None


def fields(data: object, defaults: dict[str, Any]) -> dict[str, Any]:
    """A proxy's fields from a JSON object: `defaults` with what it sets, each of the default's type."""
    if not isinstance(data, dict):
        raise ApiError("bad request body: a proxy must be a JSON object", 400)
    found = dict(defaults)
    for key, default in defaults.items():
        value = data.get(key)
        if value is None:
            continue
        if type(value) is not type(default):
            kind = "a boolean" if isinstance(default, bool) else "a string"
            raise ApiError(f"bad request body: {key}: must be {kind}", 400)
        found[key] = value
    return found


@final
class ToxiproxyApi:
    """Toxiproxy's routes over `proxies` (see the module docstring)."""

    def __init__(self, proxies: Proxies) -> None:
        self.proxies = proxies
        self.routes: dict[tuple[str, int], dict[str, Handler]] = {
            ("proxies", 1): {"GET": self.proxy_index, "POST": self.proxy_create},
            ("proxies", 2): {"GET": self.proxy_show, "POST": self.proxy_update, "PATCH": self.proxy_update,
                             "DELETE": self.proxy_delete},
            ("proxies", 3): {"GET": self.toxic_index, "POST": self.toxic_create},
            ("proxies", 4): {"GET": self.toxic_show, "POST": self.toxic_update, "PATCH": self.toxic_update,
                             "DELETE": self.toxic_delete},
            ("reset", 1): {"POST": self.reset},
            ("populate", 1): {"POST": self.populate},
            ("version", 1): {"GET": self.version},
        }  # fmt: skip

    async def route(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                    token: str) -> Reply:  # fmt: skip
        """One request (the admin shell's router: it screened Host and Origin already)."""
        agent = next((value for name, value in headers if name == b"user-agent"), b"")
        request_id = (("X-Toxiproxy-Request-Id", secrets.token_hex(10)),)
        if agent.startswith(b"Mozilla/"):
            found: Reply = Reply(403, ERROR_TYPE, b"User agent not allowed\n")
        else:
            found = await self._dispatch(method, target.split("?", 1)[0], body)
        return Reply(found.status, found.content_type, found.body, request_id + found.extra_headers)

    async def _dispatch(self, method: str, path: str, body: bytes) -> Reply:
        parts = [unquote(part) for part in path.strip("/").split("/")]
        handlers = self.routes.get((parts[0], len(parts)))
        if handlers is None or not all(parts) or (len(parts) > 2 and parts[2] != "toxics"):
            return Reply(404, ERROR_TYPE, b"404 page not found\n")
        handler = handlers.get(method)
        if handler is None:
            return Reply(405, ERROR_TYPE, b"")
        try:
            return await handler(parts, method, body)
        except ApiError as exc:
            return error(exc)

    # ------------------------------------------------------------ proxies

    async def proxy_index(self, parts: list[str], method: str, body: bytes) -> Reply:
        proxies = self.proxies.proxies
        return reply(200, {name: proxies[name].as_json() for name in sorted(proxies)})

    async def proxy_create(self, parts: list[str], method: str, body: bytes) -> Reply:
        given = fields(decode(body), {"name": "", "listen": "", "upstream": "", "enabled": True})
        for key in ("name", "upstream"):
            if not given[key]:
                raise ApiError(f"missing required field: {key}", 400)
        proxy = await self.proxies.create(given["name"], given["listen"], given["upstream"],
                                          enabled=given["enabled"])  # fmt: skip
        return reply(201, proxy.as_json())

    async def proxy_show(self, parts: list[str], method: str, body: bytes) -> Reply:
        return reply(200, self.proxies.get(parts[1]).as_json())

    async def proxy_update(self, parts: list[str], method: str, body: bytes) -> Reply:
        proxy = self.proxies.get(parts[1])
        given = fields(decode(body), {"listen": proxy.listen, "upstream": proxy.upstream,
                                      "enabled": proxy.enabled})  # fmt: skip
        updated = await self.proxies.update(parts[1], given["listen"], given["upstream"], given["enabled"])
        return reply(200, updated.as_json())

    async def proxy_delete(self, parts: list[str], method: str, body: bytes) -> Reply:
        await self.proxies.delete(parts[1])
        return Reply(204, JSON, b"")

    async def reset(self, parts: list[str], method: str, body: bytes) -> Reply:
        await self.proxies.reset()
        return Reply(204, JSON, b"")

    async def populate(self, parts: list[str], method: str, body: bytes) -> Reply:
        data = decode(body)
        if not isinstance(data, list):
            raise ApiError("bad request body: populate takes a JSON array of proxies", 400)
        entries = []
        for number, item in enumerate(data, 1):
            given = fields(item, {"name": "", "listen": "", "upstream": "", "enabled": True})
            for key in ("name", "upstream"):
                if not given[key]:
                    return _populated([], ApiError(f"missing required field: {key} at proxy {number}", 400))
            entries.append((given["name"], given["listen"], given["upstream"], given["enabled"]))
        done, failure = await self.proxies.populate(entries)
        return _populated(done, failure)

    async def version(self, parts: list[str], method: str, body: bytes) -> Reply:
        return Reply(200, "application/json;charset=utf-8", f'{{"version": "{VERSION}"}}\n'.encode())

    # ------------------------------------------------------------ toxics

    async def toxic_index(self, parts: list[str], method: str, body: bytes) -> Reply:
        return reply(200, [toxic.as_json() for toxic in self.proxies.get(parts[1]).toxics])

    async def toxic_create(self, parts: list[str], method: str, body: bytes) -> Reply:
        toxics = self.proxies.get(parts[1]).toxics
        return reply(200, toxics.add(parse_toxic(decode(body))).as_json())

    async def toxic_show(self, parts: list[str], method: str, body: bytes) -> Reply:
        toxic = self.proxies.get(parts[1]).toxics.find(parts[3])
        if toxic is None:
            raise ApiError("toxic not found", 404)
        return reply(200, toxic.as_json())

    async def toxic_update(self, parts: list[str], method: str, body: bytes) -> Reply:
        toxics = self.proxies.get(parts[1]).toxics
        if toxics.find(parts[3]) is None:
            raise ApiError("toxic not found", 404)
        return reply(200, toxics.update(parts[3], decode(body)).as_json())

    async def toxic_delete(self, parts: list[str], method: str, body: bytes) -> Reply:
        self.proxies.get(parts[1]).toxics.remove(parts[3])
        return Reply(204, JSON, b"")


def _populated(done: list[Proxy], failure: ApiError | None) -> Reply:
    """/populate's answer: Go's struct with the error's fields (when there is one) and the proxies."""
    document: dict[str, Any] = {} if failure is None else {"error": failure.message, "status": failure.status}
    document["proxies"] = [proxy.as_json() for proxy in done] or None  # Go's nil slice is null
    return reply(201 if failure is None else failure.status, document)


# ---------------------------------------------------------------- the server


def toxiproxy_balancer(host: str, port: int, *, io: str = "auto", seed: int | None = None, api: bool = True
                       ) -> tuple[Balancer, Proxies]:  # fmt: skip
    """A balancer with no proxy yet; with `api`, its admin endpoint on host:port speaks toxiproxy's API."""
    named = ip_address_or_none(host) is None and host != "localhost"
    names = (host,) if named else ()  # a name we listen on is ours
    admin = AdminConfig(Address(host, port), hosts=names) if api else None
    settings = Settings(drain_timeout=0.0, access_log=False)
    config = Config({}, {}, settings, admin, "anubis toxiproxy")
    binds = BindRecorder()
    balancer = Balancer(config, io=io, open_socket=binds)
    proxies = Proxies(balancer, binds, seed=seed)
    if balancer.admin is not None:
        balancer.admin.router = ToxiproxyApi(proxies).route
    return balancer, proxies


async def serve_toxiproxy(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, io: str = "auto", seed: int | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Serve toxiproxy's API until SIGTERM or SIGINT; started() with the API's bound address."""
    balancer, _ = toxiproxy_balancer(host, port, io=io, seed=seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(run_until_signalled, balancer))
        assert balancer.admin_address is not None
        task_status.started(balancer.admin_address)

