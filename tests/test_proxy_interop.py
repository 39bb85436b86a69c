"""The PROXY protocol against real peers: HAProxy in front of us, nginx behind us."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import EVENTUALLY, config_for, echo_handler, free_port, running_balancer, start_backend
from tests.helpers import (
    admin_config,
    connect_from,
    exchange,
    http,
    peer_process,
)
from tests.peers import need
from trioanubis.config import Address


def haproxy_config(tmp: Path, listen: int, target: Address, option: str) -> Path:
    path = tmp / "haproxy.cfg"
    path.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{listen}
    default_backend anubis
backend anubis
    server anubis {target.host}:{target.port} {option}
""")
    return path


def nginx_config(tmp: Path, listen: int) -> Path:
    path = tmp / "nginx.conf"
    path.write_text(f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{listen} proxy_protocol;
        location / {{ return 200 "client $proxy_protocol_addr:$proxy_protocol_port\\n"; }}
    }}
}}
""")
    return path


@asynccontextmanager
async def haproxy(tmp: Path, target: Address, option: str) -> AsyncIterator[Address]:
    port = free_port()
    argv = [need("haproxy"), "-db", "-f", str(haproxy_config(tmp, port, target, option))]
    async with peer_process(argv, port, tmp / "haproxy.log"):
        yield Address("127.0.0.1", port)


@asynccontextmanager
async def nginx(tmp: Path) -> AsyncIterator[Address]:
    port = free_port()
    argv = [need("nginx"), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(nginx_config(tmp, port)),
            "-g", "daemon off;"]  # fmt: skip
    async with peer_process(argv, port, tmp / "nginx.log"):
        yield Address("127.0.0.1", port)


GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


@pytest.mark.slow
@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_in_front_names_the_client_in_the_access_log_and_stats(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, option: str
) -> None:
    backend = await start_backend(nursery, echo_handler)
    caplog.set_level(logging.INFO, logger="trioanubis")
    data = admin_config([backend.address])
    data["listeners"]["test"].update(accept_proxy=True, proxy_trusted=["127.0.0.1/32"])
    async with running_balancer(data) as (balancer, address), haproxy(tmp_path, address, option) as front:
        stream = await connect_from("127.0.0.2", front)  # HAProxy sees 127.0.0.2; we see HAProxy
        client = f"127.0.0.2:{stream.socket.getsockname()[1]}"
        await stream.send_all(b"hello")
        assert await stream.receive_some(5) == b"hello"
        _, _, body = await http(balancer.admin_address, "GET", "/stats")  # type: ignore[arg-type]
        listener = json.loads(body)["listeners"][0]
        assert listener["busiest_clients"] == [{"client": "127.0.0.2", "active": 1}]
        assert await exchange(stream, b" world") == b" world"
        with trio.fail_after(EVENTUALLY):
            while not any(r.name == "trioanubis.access" for r in caplog.records):
                await trio.sleep(0.01)
    clients = [r.access["client"] for r in caplog.records if r.name == "trioanubis.access"]  # type: ignore[attr-defined]
    assert clients == [client]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_to_nginx_names_the_real_client(tmp_path: Path, version: str) -> None:
    async with nginx(tmp_path) as backend:
        data = config_for([str(backend)], send_proxy=version)
        async with running_balancer(data) as (_, address):
            stream = await connect_from("127.0.0.2", address)
            port = stream.socket.getsockname()[1]
            answer = await exchange(stream, GET)
    assert answer is not None and answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(f"client 127.0.0.2:{port}\n".encode())


@pytest.mark.slow
async def test_health_checks_reach_a_proxy_protocol_nginx_only_with_health_send_proxy(tmp_path: Path) -> None:
    health: dict[str, Any] = {"check": "http", "path": "/", "expect_body": "client", "interval": "100ms"}
    async with nginx(tmp_path) as backend:
        data = config_for([str(backend)], send_proxy="v2", health=health)
        async with running_balancer(data) as (balancer, _):
            server = balancer.pools["test"].servers[0]
            assert server.state == "down"  # nginx refuses a check that sends no header
        health["send_proxy"] = True
        data = config_for([str(backend)], send_proxy="v2", health=health)
        async with running_balancer(data) as (balancer, address):
            assert balancer.pools["test"].servers[0].state == "up"  # a LOCAL header: nginx serves it
            answer = await exchange(await connect_from("127.0.0.2", address), GET)
    assert answer is not None and b"client 127.0.0.2:" in answer


@pytest.mark.slow
async def test_haproxy_to_us_to_nginx_carries_the_client_through(tmp_path: Path) -> None:
    (tmp_path / "haproxy").mkdir()
    (tmp_path / "nginx").mkdir()
    async with nginx(tmp_path / "nginx") as backend:
        data = config_for([str(backend)], send_proxy="v1",
                          listener={"accept_proxy": True, "proxy_trusted": ["127.0.0.1"]})  # fmt: skip
        async with running_balancer(data) as (_, address), \
                haproxy(tmp_path / "haproxy", address, "send-proxy-v2") as front:  # fmt: skip
            stream = await connect_from("127.0.0.2", front)
            port = stream.socket.getsockname()[1]
            answer = await exchange(stream, GET)
    assert answer is not None and answer.endswith(f"client 127.0.0.2:{port}\n".encode())
