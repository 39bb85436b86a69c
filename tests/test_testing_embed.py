"""open_balancer: a balancer in the caller's Trio tree, two at once, two in two threads, its controls."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import trioanubis
from tests.conftest import IO_BACKEND, config_for, echo_round_trip, request, start_backend, wait_until
from tests.conftest import name_handler as named
from trioanubis import ConfigError, open_balancer
from trioanubis.config import Address


async def test_two_balancers_at_once_relay_and_exit_cleanly() -> None:
    async with trio.open_nursery() as nursery:
        a = await start_backend(nursery, named("a"), "a")
        b = await start_backend(nursery, named("b"), "b")
        async with (
            open_balancer(config_for([a.address]), io=IO_BACKEND) as one,
            open_balancer(config_for([b.address]), io=IO_BACKEND) as two,
        ):
            assert one.address() != two.address()
            for _ in range(3):
                assert await request(one.address()) == b"a"
                assert await request(two.address()) == b"b"
        assert one.endings.get("client_eof", 0) + one.endings.get("server_eof", 0) == 3
        assert two.active == 0
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_the_config_comes_as_toml_text_a_path_or_a_dict(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, named("x"), "x")
        text = (
            f'[listeners.web]\nbind = "127.0.0.1:0"\npool = "p"\n[pools.p]\nservers = ["{backend.address}"]\n'
            '[pools.p.health]\ncheck = "none"\n'
        )
        path = tmp_path / "lb.toml"
        path.write_text(text)
        for source in (text, path, str(path), config_for([backend.address])):
            async with open_balancer(source, io=IO_BACKEND) as handle:
                assert await request(handle.address()) == b"x"
        nursery.cancel_scope.cancel()
    with pytest.raises(ConfigError, match=r"pools\.p\.servers"):
        async with open_balancer(
            {
                "listeners": {"w": {"bind": "127.0.0.1:0", "pool": "p"}},
                "pools": {"p": {"servers": ["nowhere"]}},
            }
        ):
            pass


@pytest.mark.slow
async def test_the_environment_does_not_choose_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANUBIS_IO is `anubis run`'s: an embedding program's balancer ignores it (here: a bad value)."""
    monkeypatch.setenv("ANUBIS_IO", "no-such-backend")
    async with trio.open_nursery() as nursery:
        backend = await start_backend(nursery, named("y"), "y")
        async with open_balancer(config_for([backend.address])) as handle:
            assert await request(handle.address()) == b"y"
        nursery.cancel_scope.cancel()


async def test_the_handle_drains_weighs_faults_adds_and_removes_servers() -> None:
    async with trio.open_nursery() as nursery:
        a = await start_backend(nursery, named("a"), "a")
        b = await start_backend(nursery, named("b"), "b")
        async with open_balancer(config_for([a.address]), io=IO_BACKEND) as lb:
            await lb.add_server("test", b.address, name="b")
            assert {await request(lb.address()) for _ in range(4)} == {b"a", b"b"}
            await lb.drain("test", a.address)
            assert {await request(lb.address()) for _ in range(4)} == {b"b"}
            await lb.enable("test", a.address)
            await lb.set_weight("test", "b", 0)
            assert {await request(lb.address()) for _ in range(4)} == {b"a"}
            await lb.set_faults("test", a.address, {"close_after": "1B", "direction": "downstream"})
            assert await request(lb.address()) == b"a"[:1]
            await lb.set_faults("test", a.address, None)
            await lb.set_weight("test", "b", 1)
            await lb.remove_server("test", a.address)
            assert {await request(lb.address()) for _ in range(4)} == {b"b"}
            with pytest.raises(LookupError, match="servers: b"):
                await lb.drain("test", "a")
            with pytest.raises(ValueError, match="weight"):
                await lb.set_weight("test", "b", -1)
        nursery.cancel_scope.cancel()


def run_in_thread(backend: Address, payload: bytes, results: dict[str, Any], key: str) -> None:
    async def main() -> None:
        async with open_balancer(config_for([str(backend)]), io=IO_BACKEND) as lb:
            for _ in range(3):
                await echo_round_trip(lb.address(), payload)
        results[key] = lb.endings  # every connection recorded: the balancer has stopped

    try:
        trio.run(main)
    except BaseException as exc:  # reported by the test's thread
        results[key] = exc


@pytest.mark.slow
async def test_two_balancers_in_two_threads_relay_byte_exact() -> None:
    async with trio.open_nursery() as nursery:
        echo = await start_backend(nursery)
        results: dict[str, Any] = {}
        payloads = {key: os.urandom(1 << 20) for key in ("one", "two")}
        threads = [
            threading.Thread(
                target=run_in_thread, args=(Address("127.0.0.1", echo.port), payloads[key], results, key)
            )
            for key in payloads
        ]
        for thread in threads:
            thread.start()
        await wait_until(lambda: len(results) == 2, timeout=60)
        for thread in threads:
            thread.join()
        for key in payloads:
            assert not isinstance(results[key], BaseException), results[key]
            assert sum(results[key].values()) == 3, results[key]
        assert hashlib.sha256(payloads["one"]).digest() != hashlib.sha256(payloads["two"]).digest()
        nursery.cancel_scope.cancel()


@pytest.mark.slow
def test_the_public_names_are_declared() -> None:
    for name in trioanubis.__all__:
        assert getattr(trioanubis, name) is not None
    with pytest.raises(AttributeError):
        trioanubis.no_such_name  # noqa: B018
