"""`anubis toxiproxy` side by side with Shopify's toxiproxy server: the same calls, the same answers.

    TOXIPROXY_SERVER=/path/to/toxiproxy-server python -m pytest -p no:cacheprovider bench/toxiproxy_compare.py

Runs only where the real server is installed: `toxiproxy-server` on PATH, or its path in
$TOXIPROXY_SERVER. No Debian package brings it and CI cannot fetch its source to build it, so this
lives in bench/ (outside the test suite, which under CI must never skip) and is run by hand:
build the server with a copy of github.com/Shopify/toxiproxy's source and Debian's Go (offline:
the shared build-toxiproxy-server script does it), then run the line above from the repository.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import EVENTUALLY, free_port

REAL = os.environ.get("TOXIPROXY_SERVER") or shutil.which("toxiproxy-server")
pytestmark = pytest.mark.skipif(
    REAL is None, reason="the real toxiproxy server is not installed (not a CI peer: built from source)"
)


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode())
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw.strip() else None
    finally:
        conn.close()


@pytest.fixture
def servers() -> Iterator[dict[str, int]]:
    ports = {"toxiproxy": free_port(), "anubis": free_port()}
    commands = {
        "toxiproxy": [str(REAL), "-host", "127.0.0.1", "-port", str(ports["toxiproxy"])],
        "anubis": [sys.executable, "-m", "trioanubis", "toxiproxy", "--port", str(ports["anubis"])],
    }
    processes = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands.values()
    ]
    try:
        for port in ports.values():
            deadline = time.monotonic() + EVENTUALLY
            while True:
                try:
                    call(port, "GET", "/proxies")
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(EVENTUALLY)


SCRIPT: list[tuple[str, str, Any]] = [
    ("POST", "/proxies", {"name": "db", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:1"}),
    ("POST", "/proxies", {"name": "db", "upstream": "127.0.0.1:1"}),
    ("POST", "/proxies", {"upstream": "127.0.0.1:1"}),
    ("POST", "/proxies", {"name": "x"}),
    ("POST", "/proxies/db/toxics", {"type": "latency", "attributes": {"latency": 100, "jitter": 10}}),
    ("POST", "/proxies/db/toxics", {"type": "latency"}),
    ("POST", "/proxies/db/toxics", {"type": "latency", "stream": "upstream", "toxicity": 0.25}),
    ("POST", "/proxies/db/toxics", {"type": "nope"}),
    ("POST", "/proxies/db/toxics", {"type": "latency", "stream": "walrus"}),
    ("POST", "/proxies/db/toxics", {"name": "s", "type": "slicer", "attributes": {"average_size": 9}}),
    ("POST", "/proxies/db/toxics/latency_downstream", {"attributes": {"latency": 7}}),
    ("GET", "/proxies/db/toxics", None),
    ("GET", "/proxies/db/toxics/nope", None),
    ("DELETE", "/proxies/db/toxics/s", None),
    ("POST", "/proxies/db", {"enabled": False}),
    ("POST", "/populate", [{"name": "two", "upstream": "127.0.0.1:1", "enabled": False}, {"name": ""}]),
    ("POST", "/populate", [{"name": "two", "upstream": "127.0.0.1:1", "enabled": False}]),
    ("POST", "/reset", None),
    ("GET", "/proxies/db/toxics", None),
    ("DELETE", "/proxies/nope", None),
    ("DELETE", "/proxies/two", None),
]


def normalised(document: Any) -> Any:
    """Listen ports differ between the two servers: compare the rest. Toxiproxy 2.12 also shows each
    proxy's zerolog `Logger` (an exported field without a json tag), as `{}`: left out."""
    if isinstance(document, dict):
        return {k: ("PORT" if k == "listen" else normalised(v)) for k, v in document.items() if k != "Logger"}
    if isinstance(document, (list, tuple)):
        return [normalised(v) for v in document]
    return document


def test_the_same_calls_get_the_same_answers(servers: dict[str, int]) -> None:
    for method, path, body in SCRIPT:
        real = call(servers["toxiproxy"], method, path, body)
        ours = call(servers["anubis"], method, path, body)
        assert normalised(ours) == normalised(real), (method, path, body)


def test_limit_data_and_latency_act_alike(servers: dict[str, int]) -> None:
    echo = socket.create_server(("127.0.0.1", 0))
    upstream = f"127.0.0.1:{echo.getsockname()[1]}"
    try:
        results = {}
        for name, port in servers.items():
            _, proxy = call(
                port, "POST", "/proxies", {"name": "e", "listen": "127.0.0.1:0", "upstream": upstream}
            )
            call(port, "POST", "/proxies/e/toxics", {"type": "limit_data", "stream": "upstream",
                                                     "attributes": {"bytes": 1000}})  # fmt: skip
            client = socket.create_connection(("127.0.0.1", int(proxy["listen"].rpartition(":")[2])))
            server, _ = echo.accept()
            client.sendall(os.urandom(5000))
            got = b""
            server.settimeout(EVENTUALLY)
            while data := server.recv(65536):
                got += data
            results[name] = len(got)
            client.close()
            server.close()
        assert results == {"toxiproxy": 1000, "anubis": 1000}
    finally:
        echo.close()
