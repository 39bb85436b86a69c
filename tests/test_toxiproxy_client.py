"""An existing toxiproxy client that nobody here wrote (toxiproxy-python, from PyPI) drives the real
`anubis toxiproxy` command unchanged; the effects it asks for are measured on real connections.

toxiproxy-python has no call to update a toxic nor the server's /populate (its `populate` is made of
create and destroy calls, used here as it is); tests/test_toxiproxy_api.py covers those routes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import toxiproxy
from toxiproxy.api import APIConsumer

from tests.conftest import EVENTUALLY, free_port


@pytest.fixture
def server() -> Iterator[toxiproxy.Toxiproxy]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trioanubis", "toxiproxy", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    APIConsumer.host, APIConsumer.port = "127.0.0.1", port
    client = toxiproxy.Toxiproxy()
    try:
        deadline = time.monotonic() + EVENTUALLY
        while not client.running():
            assert time.monotonic() < deadline and process.poll() is None, "anubis toxiproxy did not start"
            time.sleep(0.05)
        yield client
    finally:
        process.terminate()
        process.wait(EVENTUALLY)


@pytest.fixture
def echo() -> Iterator[str]:
    """A blocking echo server in a thread: what toxiproxy's own tests put behind a proxy."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    def pump(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        listener.close()
        thread.join(EVENTUALLY)
        assert not thread.is_alive()


def connect(proxy: toxiproxy.Proxy) -> socket.socket:
    host, _, port = proxy.listen.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=EVENTUALLY)
    return sock


def echo_time(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        data = sock.recv(65536)
        assert data, "closed"
        received += data
    assert received == payload
    return time.monotonic() - started


@pytest.mark.slow
def test_the_clients_calls_work_unchanged(server: toxiproxy.Toxiproxy, echo: str) -> None:
    proxy = server.create(upstream=echo, name="echo")
    assert proxy.enabled and proxy.listen.startswith("127.0.0.1:")
    assert set(server.proxies()) == {"echo"}
    assert server.version().startswith(b'{"version": "2.12.0')
    proxy.add_toxic(type="latency", attributes={"latency": 50})
    proxy.add_toxic(type="bandwidth", stream="upstream", attributes={"rate": 1000}, toxicity=0.5)
    toxics = proxy.toxics()
    assert set(toxics) == {"latency_downstream", "bandwidth_upstream"}
    assert toxics["bandwidth_upstream"].toxicity == 0.5 and toxics["latency_downstream"].attributes == {
        "latency": 50,
        "jitter": 0,
    }
    proxy.destroy_toxic("bandwidth_upstream")
    assert list(proxy.toxics()) == ["latency_downstream"]
    with proxy.down():
        assert not server.get_proxy("echo").enabled
        with pytest.raises(OSError):
            connect(proxy)
    with connect(proxy) as sock:
        assert echo_time(sock) >= 0.05
    assert server.reset() and proxy.toxics() == {}
    populated = server.populate(
        [
            {"name": "echo", "upstream": echo, "listen": proxy.listen},
            {"name": "other", "upstream": echo, "listen": "127.0.0.1:0"},
        ]
    )
    assert [p.name for p in populated] == ["other"]  # "echo" matched and was kept
    with pytest.raises(toxiproxy.server.ProxyExists):
        server.create(upstream=echo, name="other")
    server.destroy_all()
    assert server.proxies() == {}


@pytest.mark.slow
def test_measured_effects_match_the_spec(server: toxiproxy.Toxiproxy, echo: str) -> None:
    """Latency and bandwidth never faster than asked (a fault can only add time; how close they come,
    within toxiproxy's 10 %, is measured by bench/toxics.py: no upper bound on shared cores here),
    limit_data exact."""
    proxy = server.create(upstream=echo, name="echo")
    with connect(proxy) as sock:
        measure(proxy, sock)


def measure(proxy: toxiproxy.Proxy, sock: socket.socket) -> None:
    proxy.add_toxic(type="latency", attributes={"latency": 500})  # downstream: once per round trip
    assert echo_time(sock) >= 0.5
    proxy.destroy_toxic("latency_downstream")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 200})  # 200 KB/s: 400 KB in about 2 s
    assert echo_time(sock, os.urandom(400_000)) >= 2.0 * 0.9  # the first 1/20 s step leaves at once
    proxy.destroy_toxic("bandwidth_downstream")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 12345})
    sock.sendall(os.urandom(50_000))
    received = 0
    while data := sock.recv(65536):
        received += len(data)
    assert received == 12345
