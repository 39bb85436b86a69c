"""TLS against real peers: nginx TLS backends, curl, openssl s_client, h2load."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.conftest import connect, free_port, receive_all, running_balancer, wait_until
from tests.helpers import peer_process
from tests.peers import need
from tests.tlscerts import Authority, Pair
from trioanubis.config import Address


def nginx_tls_config(tmp: Path, servers: list[tuple[int, Pair | None, str]]) -> Path:
    """One nginx with a server per (port, certificate or None for plaintext, body); `/big` serves a file."""
    blocks = []
    for port, pair, body in servers:
        tls = f"ssl http2;\n ssl_certificate {pair.cert};\n ssl_certificate_key {pair.key};" if pair else ";"
        blocks.append(f"""
    server {{
        listen 127.0.0.1:{port} {tls}
        root {tmp};
        location = / {{ return 200 "{body}\\n"; }}
    }}""")
    path = tmp / "nginx.conf"
    user = "user root;" if os.getuid() == 0 else ""  # workers must read the test's files
    path.write_text(f"""
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {"".join(blocks)}
}}
""")
    return path


@asynccontextmanager
async def nginx_tls(tmp: Path, servers: list[tuple[Pair | None, str]]) -> AsyncIterator[list[Address]]:
    ports = [free_port() for _ in servers]
    config = nginx_tls_config(
        tmp, [(port, pair, body) for port, (pair, body) in zip(ports, servers, strict=True)]
    )
    argv = [
        need("nginx"),
        "-p",
        str(tmp),
        "-e",
        str(tmp / "error.log"),
        "-c",
        str(config),
        "-g",
        "daemon off;",
    ]
    async with peer_process(argv, ports[-1], tmp / "nginx.log"):
        yield [Address("127.0.0.1", port) for port in ports]


async def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


def sni_data(api: Address, web: Address) -> dict[str, object]:
    routes = [{"sni": "api.example.com", "pool": "api"}, {"sni": "*.example.com", "pool": "web"}]
    return {
        "listeners": {"sni": {"bind": "127.0.0.1:0", "routes": routes}},
        "pools": {"api": {"servers": [str(api)]}, "web": {"servers": [str(web)]}},
    }


@pytest.mark.slow
async def test_curl_and_openssl_reach_each_backend_by_name_and_see_its_certificate(tmp_path: Path) -> None:
    curl, openssl = need("curl"), need("openssl")
    ca = Authority(tmp_path)
    backends = [(ca.issue("api.example.com"), "api backend"), (ca.issue("*.example.com"), "web backend")]
    async with (
        nginx_tls(tmp_path, backends) as (api, web),
        running_balancer(sni_data(api, web)) as (_, front),
    ):
        for name, body in (("api.example.com", b"api backend\n"), ("www.example.com", b"web backend\n")):
            resolve = f"{name}:{front.port}:127.0.0.1"
            result = await run([curl, "-sS", "--cacert", ca.pair.cert, "--resolve", resolve,
                                f"https://{name}:{front.port}/"])  # fmt: skip
            assert result.stdout == body, result.stderr
        for name, subject in (
            ("api.example.com", "CN = api.example.com"),
            ("x.example.com", "CN = *.example.com"),
        ):
            result = await trio.run_process(
                [
                    openssl,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{front.port}",
                    "-servername",
                    name,
                    "-CAfile",
                    ca.pair.cert,
                    "-verify_return_error",
                ],
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            output = result.stdout.decode()
            assert f"subject={subject}" in output.replace("subject=", "subject=").replace(
                "subject= ", "subject="
            )
            assert "Verify return code: 0 (ok)" in output


@pytest.mark.slow
async def test_h2load_speaks_http2_end_to_end_through_sni_routing(tmp_path: Path) -> None:
    h2load = need("h2load")
    ca = Authority(tmp_path)
    backends = [(ca.issue("api.example.com"), "api backend"), (ca.issue("*.example.com"), "web backend")]
    async with (
        nginx_tls(tmp_path, backends) as (api, web),
        running_balancer(sni_data(api, web)) as (_, front),
    ):
        target = f"--connect-to=127.0.0.1:{front.port}"
        result = await run([h2load, "-n", "200", "-c", "4", "-m", "10", target,
                            f"https://api.example.com:{front.port}/"])  # fmt: skip
    output = result.stdout.decode()
    assert "Application protocol: h2" in output, output
    assert "200 succeeded, 0 failed, 0 errored" in output, output


@pytest.mark.slow
async def test_curl_to_a_terminating_listener_downloads_64_mib_byte_exact(tmp_path: Path) -> None:
    curl = need("curl")
    ca = Authority(tmp_path)
    big = tmp_path / "big"
    with big.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    pair = ca.issue("localhost")
    async with nginx_tls(tmp_path, [(None, "plain")]) as (plain,):
        data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p",
                                    "tls": {"cert": pair.cert, "key": pair.key}}},
                "pools": {"p": {"servers": [str(plain)]}}}  # fmt: skip
        async with running_balancer(data) as (balancer, front):
            out = tmp_path / "got"
            result = await run([curl, "-fsS", "--cacert", ca.pair.cert, "-o", str(out),
                                f"https://localhost:{front.port}/big"])  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
            upload = await run([curl, "-sS", "--cacert", ca.pair.cert, "--data-binary", f"@{big}",
                                f"https://localhost:{front.port}/"])  # fmt: skip
            assert upload.stdout == b"plain\n", (upload.stderr, upload.returncode)
            server = balancer.pools["p"].servers[0]
            await wait_until(lambda: server.bytes_in >= 64 << 20 and server.bytes_out >= 64 << 20)


@pytest.mark.slow
async def test_an_originating_pool_refuses_expired_and_foreign_certificates_and_fails_over(
    tmp_path: Path,
) -> None:
    ca, stranger = Authority(tmp_path), Authority(tmp_path, "stranger-ca")
    backends = [(ca.issue("127.0.0.1", expired=True, file="old"), "expired"),
                (stranger.issue("127.0.0.1", file="foreign"), "foreign"),
                (ca.issue("127.0.0.1", file="good"), "good")]  # fmt: skip
    async with nginx_tls(tmp_path, backends) as addresses:
        servers = [
            {"address": str(a), "name": name} for a, (_, name) in zip(addresses, backends, strict=True)
        ]
        data = {"listeners": {"t": {"bind": "127.0.0.1:0", "pool": "p"}},
                "pools": {"p": {"servers": servers, "retries": 2, "health": {"check": "none"},
                                "tls": {"ca": ca.pair.cert}}}}  # fmt: skip
        async with running_balancer(data) as (balancer, front):
            for _ in range(3):
                stream = await connect(front)  # no half-close: a close_notify early makes nginx reset
                await stream.send_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                answer = await receive_all(stream)
                await stream.aclose()
                assert answer.endswith(b"\r\n\r\ngood\n"), answer
            failures = {s.name: s.connect_failures for s in balancer.pools["p"].servers}
    assert failures["expired"] >= 1 and failures["foreign"] >= 1 and failures["good"] == 0


@pytest.mark.slow
async def test_an_originating_pool_sends_its_proxy_header_before_the_tls_handshake(tmp_path: Path) -> None:
    """`send_proxy` with `tls` (HAProxy's send-proxy on an ssl server): nginx reads the header in clear
    text, then the handshake, and names the client the header carried."""
    ca = Authority(tmp_path)
    pair = ca.issue("backend.test")
    port = free_port()
    config = tmp_path / "nginx.conf"
    user = "user root;" if os.getuid() == 0 else ""
    config.write_text(f"""
{user}
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl proxy_protocol;
        ssl_certificate {pair.cert};
        ssl_certificate_key {pair.key};
        location / {{ return 200 "client $proxy_protocol_addr:$proxy_protocol_port over $ssl_protocol\\n"; }}
    }}
}}
""")
    argv = [need("nginx"), "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(config),
            "-g", "daemon off;"]  # fmt: skip
    for version in ("v1", "v2"):
        data = {
            "listeners": {"web": {"bind": "127.0.0.1:0", "pool": "web"}},
            "pools": {"web": {"servers": [f"127.0.0.1:{port}"], "send_proxy": version,
                              "health": {"check": "none"},
                              "tls": {"ca": ca.pair.cert, "sni": "backend.test"}}},
        }  # fmt: skip
        async with peer_process(argv, port, tmp_path / "nginx.log"), running_balancer(data) as (_, address):
            stream = await connect(address)
            client_port = stream.socket.getsockname()[1]
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: backend.test\r\nConnection: close\r\n\r\n")
            answer = await receive_all(stream)
            await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert f"client 127.0.0.1:{client_port} over TLSv1.".encode() in answer, answer  # the header, in TLS
