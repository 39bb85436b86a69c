"""A fleet of real `anubis run` processes on one real etcd (issue 32's "Done when").

Each instance is a subprocess with its own listener and admin endpoint and the same [cluster];
servers come from etcd keys written with etcd's own `etcdctl`. Everything waits for a condition
with a deadline; the propagation times are printed (`pytest -s`), never asserted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import (
    EVENTUALLY,
    Backend,
    connect_when_listening,
    echo_handler,
    free_port,
    name_handler,
    process_logging_to,
    receive_all,
    start_backend,
    wait_until,
)
from tests.etcdserver import EtcdServer, running_etcd, tls_files
from tests.helpers import ANUBIS


@dataclass
class Instance:
    name: str
    port: int
    admin: int
    log: Path
    process: trio.Process | None = None


def instance_config(name: str, etcd: EtcdServer, port: int, admin: int, health: str, workers: int = 1,
                    cluster: str = "") -> str:  # fmt: skip
    return (f'[settings]\ndrain_timeout = "1s"\nworkers = {workers}\n'
            f'[listeners.web]\nbind = "127.0.0.1:{port}"\npool = "web"\n'
            f'[pools.web]\nservers_from = "etcd"\nretries = 0\nhealth = {health}\n'
            f'[admin]\nbind = "127.0.0.1:{admin}"\n'
            f'[cluster]\netcd = ["{etcd.endpoint}"]\nname = "{name}"\nttl = 5\ntimeout = "1s"\n'
            f'{cluster}')  # fmt: skip


@asynccontextmanager
async def fleet_instance(tmp_path: Path, etcd: EtcdServer, name: str, health: str = '{ check = "none" }',
                         workers: int = 1, cluster: str = "") -> AsyncIterator[Instance]:  # fmt: skip
    """`anubis run` for one instance; yields once its admin answers /readyz."""
    instance = Instance(name, free_port(), free_port(), tmp_path / f"{name}.log")
    path = tmp_path / f"{name}.toml"
    path.write_text(instance_config(name, etcd, instance.port, instance.admin, health, workers, cluster))
    async with process_logging_to([*ANUBIS, "run", "-c", str(path)], instance.log) as process:
        instance.process = process
        await wait_until(lambda: admin_ready(instance))
        yield instance


def admin_ready(instance: Instance) -> bool:
    assert instance.process is not None
    if instance.process.returncode is not None:
        raise AssertionError(f"{instance.name} exited: {instance.log.read_text()}")
    text = instance.log.read_text(errors="replace")
    return "admin: listening on" in text and ("workers serving" in text or "workers = 1" in text
                                              or "listener web: listening" in text)  # fmt: skip


async def admin_call(instance: Instance, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    stream = await connect_when_listening(instance.admin)
    async with stream:
        head = f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        await stream.send_all(head.encode() + body)
        answer = await receive_all(stream)
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"null")


async def server_state(instance: Instance, server: str) -> str | None:
    """The server's state in the instance's /stats ("up", "draining", ...), None if it has none."""
    _, stats = await admin_call(instance, "GET", "/stats")
    for row in stats["pools"][0]["servers"]:
        if row["name"] == server:
            return str(row["state"])
    return None


async def eventually(check: Any, timeout: float = EVENTUALLY) -> float:
    """Poll the async predicate `check` until true; how long it took (printed, never asserted)."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.01)
    return trio.current_time() - start


async def through(instance: Instance) -> bytes:
    """One connection through the instance: the backend's name (name_handler answers with it)."""
    stream = await connect_when_listening(instance.port)
    async with stream:
        await stream.send_all(b"hi")
        await stream.send_eof()
        return await receive_all(stream)


async def put_server(etcd: EtcdServer, name: str, backend: Backend, **extra: Any) -> None:
    value = json.dumps({"address": backend.address, **extra})
    await etcd.etcdctl("put", f"/anubis/pools/web/servers/{name}", value)


@asynccontextmanager
async def three_instances(tmp_path: Path, etcd: EtcdServer, *names: str) -> AsyncIterator[list[Instance]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(fleet_instance(tmp_path, etcd, name)) for name in names]


@pytest.mark.slow
async def test_a_drain_and_a_server_reach_every_instance(tmp_path: Path, nursery: trio.Nursery) -> None:
    s1 = await start_backend(nursery, name_handler("s1"), "s1")
    s2 = await start_backend(nursery, name_handler("s2"), "s2")
    async with running_etcd(tmp_path) as etcd:
        await put_server(etcd, "s1", s1)
        await put_server(etcd, "s2", s2)
        async with three_instances(tmp_path, etcd, "a", "b", "c") as (a, b, c):
            assert {await through(x) for x in (a, b, c) for _ in range(4)} == {b"s1", b"s2"}
            # A drain through A's admin: B and C stop sending new connections to s1.
            status, _ = await admin_call(a, "POST", "/pools/web/servers/s1/drain")
            assert status == 200
            took = await eventually(lambda: _all_say((b, c), "s1", "draining"))
            print(f"drain through A seen by B and C after {took * 1000:.0f} ms")
            before = s1.connections
            assert {await through(x) for x in (a, b, c) for _ in range(4)} == {b"s2"}
            assert s1.connections == before
            # A server put with etcdctl takes connections through all three; deleting it drains it.
            s3 = await start_backend(nursery, name_handler("s3"), "s3")
            await put_server(etcd, "s3", s3, weight=100)
            took = await eventually(lambda: _all_say((a, b, c), "s3", "up"))
            print(f"server put with etcdctl up in all three after {took * 1000:.0f} ms")
            for instance in (a, b, c):
                await eventually(lambda i=instance: _answers(i, b"s3"))  # type: ignore[misc]
            await etcd.etcdctl("del", "/anubis/pools/web/servers/s3")
            await eventually(lambda: _all_say((a, b, c), "s3", None))
            before = s3.connections
            assert {await through(x) for x in (a, b, c) for _ in range(4)} == {b"s2"}
            assert s3.connections == before
            # What they share is in etcd, as control.py's commands.
            got = await etcd.etcdctl("get", "/anubis/state/web/s1/drain", "--print-value-only")
            assert json.loads(got.stdout) == {"op": "drain", "pool": "web", "server": "s1"}


@pytest.mark.slow
async def test_an_instance_follows_an_etcd_that_wants_a_client_certificate_and_a_password(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """[cluster] with ca, cert, key, username and password, against an etcd that demands a client
    certificate and has auth on (user anubis may read and write under /anubis/ only): servers
    arrive, and a drain made through the admin is written back. The certificate has no CommonName:
    etcd's HTTP gateway refuses one that has (test_etcd.py checks that the error says so)."""
    s1 = await start_backend(nursery, name_handler("s1"), "s1")
    files = tls_files(tmp_path)
    async with running_etcd(tmp_path, files) as etcd:
        await etcd.enable_auth()
        await put_server(etcd, "s1", s1)
        secure = (f'ca = "{files.ca}"\ncert = "{files.no_cn_cert}"\nkey = "{files.no_cn_key}"\n'
                  'username = "anubis"\npassword = "s3cret"\n')  # fmt: skip
        async with fleet_instance(tmp_path, etcd, "a", cluster=secure) as a:
            await eventually(lambda: _all_say((a,), "s1", "up"))
            assert await through(a) == b"s1"
            status, _ = await admin_call(a, "POST", "/pools/web/servers/s1/drain")
            assert status == 200

            async def written() -> bool:
                got = await etcd.etcdctl("get", "/anubis/state/web/s1/drain", "--print-value-only")
                return bool(got.stdout.strip())

            await eventually(written)
            _, stats = await admin_call(a, "GET", "/stats")
            assert stats["cluster"]["connected"] is True, stats["cluster"]
            assert "Traceback" not in a.log.read_text()


async def _all_say(instances: tuple[Instance, ...], server: str, state: str | None) -> bool:
    return all([await server_state(i, server) == state for i in instances])


async def _answers(instance: Instance, name: bytes) -> bool:
    return await through(instance) == name


@pytest.mark.slow
async def test_an_etcd_outage_changes_nothing_and_a_queued_drain_lands_after_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    s1 = await start_backend(nursery, echo_handler, "s1")
    s2 = await start_backend(nursery, echo_handler, "s2")
    async with running_etcd(tmp_path) as etcd:
        await put_server(etcd, "s1", s1)
        await put_server(etcd, "s2", s2)
        async with three_instances(tmp_path, etcd, "a", "b", "c") as (a, b, c):
            errors: list[BaseException] = []
            rounds = [0]
            async with trio.open_nursery() as clients:
                for instance in (a, b, c):
                    clients.start_soon(_clients, instance, errors, rounds)
                await wait_until(lambda: rounds[0] >= 30)
                await etcd.kill()
                for instance in (a, b, c):
                    await wait_until(lambda i=instance: "etcd unreachable" in i.log.read_text())  # type: ignore[misc]
                status, _ = await admin_call(a, "POST", "/pools/web/servers/s1/drain")
                assert status == 200  # applied at A at once, queued for etcd
                assert await server_state(a, "s1") == "draining"
                assert await server_state(b, "s1") == "up"
                _, stats = await admin_call(a, "GET", "/stats")
                assert stats["cluster"]["connected"] is False and stats["cluster"]["queued"] == 1
                seen = rounds[0]
                await wait_until(lambda: rounds[0] >= seen + 30)  # serving on, without etcd
                await etcd.start()
                took = await eventually(lambda: _all_say((b, c), "s1", "draining"))
                print(f"drain queued at A during the outage applied by B and C {took * 1000:.0f} ms after "
                      "etcd answered again")  # fmt: skip
                s3 = await start_backend(nursery, echo_handler, "s3")
                await put_server(etcd, "s3", s3)
                took = await eventually(lambda: _all_say((a, b, c), "s3", "up"))
                print(f"after the restart, a new key seen by all three within {took * 1000:.0f} ms")
                seen = rounds[0]
                await wait_until(lambda: rounds[0] >= seen + 30)
                clients.cancel_scope.cancel()
            assert errors == []
            _, stats = await admin_call(b, "GET", "/stats")
            assert stats["cluster"]["connected"] is True and stats["cluster"]["reconnects"] >= 1
            _, metrics = await _metrics(b)
            assert "anubis_cluster_connected 1" in metrics and "anubis_cluster_reconnects_total " in metrics


async def _metrics(instance: Instance) -> tuple[int, str]:
    stream = await connect_when_listening(instance.admin)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await receive_all(stream)
    return int(answer.split()[1]), answer.partition(b"\r\n\r\n")[2].decode()


async def _clients(instance: Instance, errors: list[BaseException], rounds: list[int]) -> None:
    """Echo round trips through `instance`, one after another; any failure is kept."""
    while True:
        payload = f"{instance.name}:{rounds[0]}".encode()
        try:
            stream = await connect_when_listening(instance.port, timeout=1)
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                if await receive_all(stream) != payload:
                    errors.append(AssertionError(f"{instance.name}: echo differs"))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            errors.append(exc)
        rounds[0] += 1


@pytest.mark.slow
async def test_a_late_joiner_applies_the_drains_before_it_accepts(tmp_path: Path,
                                                                  nursery: trio.Nursery) -> None:
    s1 = await start_backend(nursery, name_handler("s1"), "s1")
    s2 = await start_backend(nursery, name_handler("s2"), "s2")
    async with running_etcd(tmp_path) as etcd:
        await put_server(etcd, "s1", s1)
        await put_server(etcd, "s2", s2)
        async with fleet_instance(tmp_path, etcd, "a") as a:
            assert (await admin_call(a, "POST", "/pools/web/servers/s1/drain"))[0] == 200
            await eventually(lambda: _has_drain(etcd))
            before = s1.connections
            late = Instance("d", free_port(), free_port(), tmp_path / "d.log")
            path = tmp_path / "d.toml"
            path.write_text(instance_config("d", etcd, late.port, late.admin, '{ check = "none" }'))
            async with process_logging_to([*ANUBIS, "run", "-c", str(path)], late.log):
                # Connect as soon as it listens: its very first connections already avoid s1.
                answers = [await through(late) for _ in range(10)]
            assert set(answers) == {b"s2"}
            assert s1.connections == before


async def _has_drain(etcd: EtcdServer) -> bool:
    return b'"op":"drain"' in (await etcd.etcdctl("get", "/anubis/state/web/s1/drain")).stdout


@pytest.mark.slow
async def test_anubis_fleet_flags_a_server_one_instance_sees_down(tmp_path: Path,
                                                                  nursery: trio.Nursery) -> None:
    echo = await start_backend(nursery, echo_handler, "echo")
    blind = '{ check = "send_expect", send = "ping", expect = "never", interval = "200ms", fall = 1 }'
    async with running_etcd(tmp_path) as etcd:
        await put_server(etcd, "s1", echo)
        async with AsyncExitStack() as stack:
            for name, health in (("a", '{ check = "tcp", interval = "200ms" }'),
                                 ("b", '{ check = "tcp", interval = "200ms" }'), ("c", blind)):  # fmt: skip
                await stack.enter_async_context(fleet_instance(tmp_path, etcd, name, health))
            config = str(tmp_path / "a.toml")
            await eventually(lambda: _disagree(config))
            document = json.loads(await _anubis_fleet(config, "--json"))
            assert [m["name"] for m in document["instances"]] == ["a", "b", "c"]
            assert document["disagreements"] == [{"pool": "web", "server": "s1", "up": ["a", "b"],
                                                  "down": ["c"]}]  # fmt: skip
            text = await _anubis_fleet(config)
            assert "3 instances" in text and "web/s1: up in a, b; DOWN in c" in text, text
            _, answer = await admin_call(_instance_of(tmp_path, "b"), "GET", "/fleet")
            assert answer["disagreements"] == document["disagreements"]


async def _anubis_fleet(config: str, *options: str) -> str:
    result = await trio.run_process([*ANUBIS, "fleet", "-c", config, *options], capture_stdout=True,
                                    capture_stderr=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def _disagree(config: str) -> bool:
    return bool(json.loads(await _anubis_fleet(config, "--json"))["disagreements"])


def _instance_of(tmp_path: Path, name: str) -> Instance:
    text = (tmp_path / f"{name}.toml").read_text()
    admin = int(text.split("[admin]\nbind = \"127.0.0.1:")[1].split('"')[0])
    return Instance(name, 0, admin, tmp_path / f"{name}.log")



@pytest.mark.slow
async def test_with_workers_the_supervisor_follows_etcd_and_every_worker_gets_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """workers = 2: the supervisor applies etcd's commands through its command path (every worker
    confirms), and each worker follows the pool's etcd servers itself."""
    s1 = await start_backend(nursery, name_handler("s1"), "s1")
    s2 = await start_backend(nursery, name_handler("s2"), "s2")
    async with running_etcd(tmp_path) as etcd:
        await put_server(etcd, "s1", s1)
        async with fleet_instance(tmp_path, etcd, "w", workers=2) as w:
            await wait_until(lambda: w.log.read_text().count("server s1 (") >= 3)  # the view and 2 workers
            assert {await through(w) for _ in range(6)} == {b"s1"}
            await put_server(etcd, "s2", s2)
            drain = '{"op":"drain","pool":"web","server":"s1"}'
            await etcd.etcdctl("put", "/anubis/state/web/s1/drain", drain)
            await eventually(lambda: _applied(w))  # counted once every worker confirmed it
            await eventually(lambda: _all_say((w,), "s2", "up"))
            assert await server_state(w, "s1") == "draining"
            before = s1.connections
            assert {await through(w) for _ in range(20)} == {b"s2"}  # both workers: none to s1
            assert s1.connections == before


async def _applied(instance: Instance) -> bool:
    _, stats = await admin_call(instance, "GET", "/stats")
    return bool(stats["cluster"]["applied"] == 1 and len(stats["workers"]) == 2)
