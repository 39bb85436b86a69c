"""`anubis toxiproxy`'s HTTP API: toxiproxy's routes, shapes, status codes, error bodies and corner
cases (its api_test.go and toxics tests), the toxics' effects on open connections, and a fuzz test."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import IO_BACKEND, ending, free_port, start_backend
from trioanubis.config import Address
from trioanubis.testing.toxics import Toxic, parse_toxic, slice_sizes
from trioanubis.testing.toxiproxy import serve_toxiproxy


class Api:
    def __init__(self, address: Address) -> None:
        self.address = address

    def _call(self, method: str, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
        conn = http.client.HTTPConnection(self.address.host, self.address.port, timeout=30)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                document = json.loads(raw) if raw else None
            except ValueError:
                document = raw.decode()
            return response.status, document, response
        finally:
            conn.close()

    async def __call__(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        status, document, _ = await trio.to_thread.run_sync(self._call, method, path, body, headers)
        return status, document

    async def raw(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        return (await trio.to_thread.run_sync(self._call, method, path, body, headers))[2]


@asynccontextmanager
async def toxiproxy() -> AsyncIterator[Api]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve_toxiproxy(
                "127.0.0.1", 0, io=IO_BACKEND, seed=1, task_status=task_status
            )
        )
        yield Api(address)
        nursery.cancel_scope.cancel()


def port_of(proxy: dict[str, Any]) -> int:
    return int(proxy["listen"].rpartition(":")[2])


async def round_trip(port: int, data: bytes = b"ping") -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        return await stream.receive_some(65536)


async def test_proxies_are_created_listed_shown_and_deleted_with_toxiproxys_shapes() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        assert await api("GET", "/proxies") == (200, {})
        status, made = await api(
            "POST", "/proxies", {"name": "db", "listen": "localhost:0", "upstream": echo.address}
        )
        assert status == 201
        assert list(made) == ["name", "listen", "upstream", "enabled", "toxics"]
        assert made["listen"].startswith("127.0.0.1:") and port_of(made) > 0  # resolved, port bound
        assert made["enabled"] is True and made["toxics"] == []
        assert await round_trip(port_of(made)) == b"ping"
        assert await api("GET", "/proxies") == (200, {"db": made})
        assert await api("GET", "/proxies/db") == (200, made)
        assert await api("POST", "/proxies", {"name": "db", "upstream": echo.address}) == (
            409,
            {"error": "proxy already exists", "status": 409},
        )
        assert await api("POST", "/proxies", {"upstream": "x:1"}) == (
            400,
            {"error": "missing required field: name", "status": 400},
        )
        assert await api("POST", "/proxies", {"name": "x"}) == (
            400,
            {"error": "missing required field: upstream", "status": 400},
        )
        status, conflict = await api(
            "POST", "/proxies", {"name": "two", "listen": made["listen"], "upstream": echo.address}
        )
        assert (status, conflict["error"]) == (
            500,
            f"listen tcp {made['listen']}: bind: address already in use",
        )
        assert (await api("DELETE", "/proxies/db"))[0] == 204
        assert await api("DELETE", "/proxies/db") == (404, {"error": "proxy not found", "status": 404})
        with pytest.raises(OSError):
            await round_trip(port_of(made))
        nursery.cancel_scope.cancel()


async def test_toxics_are_added_listed_updated_and_removed_as_toxiproxy_does() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        await api("POST", "/proxies", {"name": "db", "upstream": echo.address})
        status, toxic = await api(
            "POST", "/proxies/db/toxics", {"type": "latency", "attributes": {"latency": 100, "jitter": 10}}
        )
        assert status == 200
        assert toxic == {
            "attributes": {"latency": 100, "jitter": 10},
            "name": "latency_downstream",
            "type": "latency",
            "stream": "downstream",
            "toxicity": 1,
        }
        assert (await api("POST", "/proxies/db/toxics", {"type": "latency", "stream": "upstream"}))[0] == 200
        assert await api(
            "POST", "/proxies/db/toxics", {"name": "latency_upstream", "type": "slow_close"}
        ) == (409, {"error": "toxic already exists", "status": 409})
        assert await api("POST", "/proxies/db/toxics", {"type": "latency", "stream": "walrus"}) == (
            400,
            {"error": "stream was invalid, can be either upstream or downstream", "status": 400},
        )
        assert await api("POST", "/proxies/db/toxics", {"type": "nope"}) == (
            400,
            {"error": "invalid toxic type", "status": 400},
        )
        status, noop = await api("POST", "/proxies/db/toxics", {"name": "n", "type": "noop"})
        assert (status, noop["stream"], noop["attributes"]) == (200, "downstream", {})
        names = [t["name"] for t in (await api("GET", "/proxies/db/toxics"))[1]]
        assert names == ["latency_upstream", "latency_downstream", "n"]  # upstream's chain first
        status, changed = await api(
            "POST",
            "/proxies/db/toxics/latency_downstream",
            {"toxicity": 0.5, "attributes": {"latency": 1000}},
        )
        assert changed["attributes"] == {"latency": 1000, "jitter": 10} and changed["toxicity"] == 0.5
        status, kept = await api(
            "PATCH", "/proxies/db/toxics/latency_downstream", {"attributes": {"latency": 5}}
        )
        assert kept["toxicity"] == 0.5 and kept["attributes"]["latency"] == 5
        assert (await api("DELETE", "/proxies/db/toxics/n"))[0] == 204
        assert await api("GET", "/proxies/db/toxics/n") == (404, {"error": "toxic not found", "status": 404})
        assert (await api("POST", "/reset"))[0] == 204
        assert await api("GET", "/proxies/db/toxics") == (200, [])
        nursery.cancel_scope.cancel()


async def test_populate_checks_all_first_keeps_what_matches_and_reports_the_first_failure() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        port = free_port()
        status, made = await api(
            "POST", "/proxies", {"name": "one", "listen": f"127.0.0.1:{port}", "upstream": echo.address}
        )
        await api("POST", "/proxies/one/toxics", {"type": "latency"})
        bad = [{"name": "one", "listen": f"localhost:{port}", "upstream": echo.address}, {"listen": "x"}]
        assert await api("POST", "/populate", bad) == (
            400,
            {"error": "missing required field: name at proxy 2", "status": 400, "proxies": None},
        )
        status, answer = await api(
            "POST",
            "/populate",
            [
                {
                    "name": "one",
                    "listen": f"localhost:{port}",
                    "upstream": echo.address,
                },  # the same, resolved
                {"name": "two", "listen": "127.0.0.1:0", "upstream": echo.address, "enabled": False},
            ],
        )
        assert status == 201
        assert [p["name"] for p in answer["proxies"]] == ["one", "two"]
        assert answer["proxies"][0]["toxics"][0]["type"] == "latency"  # kept, not replaced
        assert answer["proxies"][1]["enabled"] is False and answer["proxies"][1]["listen"] == "127.0.0.1:0"
        status, failed = await api(
            "POST",
            "/populate",
            [
                {"name": "three", "upstream": echo.address},
                {"name": "four", "listen": made["listen"], "upstream": echo.address},
            ],
        )
        assert status == 500 and "address already in use" in failed["error"]
        assert [p["name"] for p in failed["proxies"]] == ["three"]
        assert sorted((await api("GET", "/proxies"))[1]) == ["one", "three", "two"]
        assert (await api("POST", "/populate", []))[1] == {"proxies": None}
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_disabling_closes_the_listener_and_the_open_connections_and_reset_enables() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        _, made = await api("POST", "/proxies", {"name": "db", "upstream": echo.address})
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(made))
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
        status, off = await api("POST", "/proxies/db", {"enabled": False})
        assert status == 200 and off["enabled"] is False and off["listen"] == made["listen"]
        assert await ending(stream) == "eof"  # toxiproxy's Close: a FIN
        await stream.aclose()
        with pytest.raises(OSError):
            await round_trip(port_of(made))
        assert (await api("POST", "/reset"))[0] == 204
        assert (await api("GET", "/proxies/db"))[1]["enabled"] is True
        assert await round_trip(port_of(made)) == b"ping"  # the same port again
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_toxics_act_on_connections_already_open() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        _, made = await api("POST", "/proxies", {"name": "db", "upstream": echo.address})
        async with await trio.open_tcp_stream("127.0.0.1", port_of(made)) as stream:
            await api("POST", "/proxies/db/toxics", {"type": "limit_data", "attributes": {"bytes": 10}})
            await stream.send_all(os.urandom(100))
            received = b""
            while chunk := await stream.receive_some(1000):
                received += chunk
            assert len(received) == 10  # exactly, then closed
        async with await trio.open_tcp_stream("127.0.0.1", port_of(made)) as stream:
            await stream.send_all(b"abc")
            assert await stream.receive_some(10) == b"abc"  # 3 of 10
            await api(
                "POST",
                "/proxies/db/toxics",
                {"type": "timeout", "stream": "upstream", "attributes": {"timeout": 0}},
            )
            await stream.send_all(b"dropped")
            await api("DELETE", "/proxies/db/toxics/timeout_upstream")  # removing it closes the link
            assert await stream.receive_some(10) == b""
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_reset_peer_resets_after_the_first_bytes() -> None:
    async with toxiproxy() as api, trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        _, made = await api("POST", "/proxies", {"name": "db", "upstream": echo.address})
        await api(
            "POST",
            "/proxies/db/toxics",
            {"type": "reset_peer", "stream": "upstream", "attributes": {"timeout": 50}},
        )
        async with await trio.open_tcp_stream("127.0.0.1", port_of(made)) as stream:
            await stream.send_all(b"reset toxic payload\n")
            assert await ending(stream) == "reset"
        nursery.cancel_scope.cancel()


async def test_the_api_refuses_browsers_and_answers_unknown_paths_as_go_does() -> None:
    async with toxiproxy() as api:
        assert await api("GET", "/proxies", **{"User-Agent": "Mozilla/5.0 (X11)"}) == (
            403,
            "User agent not allowed\n",
        )
        assert await api("GET", "/nowhere") == (404, "404 page not found\n")
        assert (await api("PUT", "/proxies"))[0] == 405
        assert (await api("GET", "/proxies/db/other"))[0] == 404
        response = await api.raw("GET", "/version")
        assert response.getheader("X-Toxiproxy-Request-Id")
        status, version = await api("GET", "/version")
        assert status == 200 and version["version"].startswith("2.12.0+trioanubis")
        assert (await api("POST", "/proxies", b"")) == (
            400,
            {"error": "bad request body: EOF", "status": 400},
        )


def test_toxic_bodies_are_checked_in_toxiproxys_order() -> None:
    toxic = parse_toxic({"type": "slicer", "attributes": {"average_size": 10, "unknown": "ignored"}})
    assert toxic == Toxic(
        "slicer_downstream",
        "slicer",
        "downstream",
        1.0,
        (("average_size", 10), ("size_variation", 0), ("delay", 0)),
    )
    assert parse_toxic({"type": "latency", "stream": "UPSTREAM"}).name == "latency_UPSTREAM"


@pytest.mark.slow
@given(st.integers(1, 200_000), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 1 << 30))
def test_slices_cover_the_chunk_with_no_empty_piece(
    size: int, average: int, variation: int, seed: int
) -> None:
    import random

    toxic = Toxic("s", "slicer", "downstream", 1, (("average_size", average), ("size_variation", variation)))
    sizes = slice_sizes(size, toxic, random.Random(seed))
    assert sum(sizes) == size and min(sizes) >= 1


BODIES = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
        max_leaves=20,
    ).map(lambda value: json.dumps(value).encode()),
)
PATHS = st.sampled_from(
    [
        "/proxies",
        "/proxies/db",
        "/proxies/db/toxics",
        "/proxies/db/toxics/latency_downstream",
        "/populate",
        "/reset",
        "/version",
        "/proxies/%00",
        "/proxies/db/toxics/",
    ]
)
METHODS = st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT"])


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(METHODS, PATHS, BODIES), min_size=1, max_size=8))
def test_any_request_gets_an_answer_and_the_server_keeps_serving(
    requests: list[tuple[str, str, bytes]],
) -> None:
    async def main() -> None:
        async with toxiproxy() as api, trio.open_nursery() as nursery:
            echo = await start_backend(nursery)
            await api("POST", "/proxies", {"name": "db", "upstream": echo.address})
            for method, path, body in requests:
                status, _ = await api(method, path, body)
                assert status < 500 or (status == 500 and path in ("/populate", "/proxies", "/reset"))
            await api("POST", "/reset")
            status, proxies = await api("GET", "/proxies")
            assert status == 200
            for proxy in proxies.values():
                if proxy["enabled"] and proxy["upstream"] == echo.address:
                    assert await round_trip(port_of(proxy)) == b"ping"
            nursery.cancel_scope.cancel()

    trio.run(main)
