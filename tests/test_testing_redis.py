"""What redis-py sees through faults, written as a user of the `anubis_proxy` fixture would write it.

Plain sync pytest: the fixture comes from the installed package's pytest11 entry point (no conftest,
no import of the balancer, no Trio). tests/test_testing_plugin.py also runs this file alone, in a
directory of its own, to show the fixture loads from the entry point.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


@pytest.fixture
def redis_server(tmp_path) -> Iterator[str]:
    """A real redis-server on a free port of 127.0.0.1, stopped after the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis("127.0.0.1", port).ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(20)


def client(proxy, timeout: float) -> redis.Redis:
    """One pooled connection, no retries: what the client sees is what the fault did."""
    return redis.Redis(
        proxy.host,
        proxy.port,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )


@pytest.mark.slow
def test_latency_makes_a_tight_timeout_expire_on_the_open_connection(anubis_proxy, redis_server):
    db = anubis_proxy(redis_server)
    r = client(db, timeout=10)
    assert r.ping()
    fast = client(db, timeout=0.05)
    assert fast.ping()  # connected before the fault: the fault acts on this very connection
    db.set_faults(latency="100ms")  # each way: a round trip of 200 ms
    with pytest.raises(redis.TimeoutError):
        fast.ping()
    assert r.ping()  # slow, but it answers
    db.clear_faults()
    assert client(db, timeout=10).set("after", "latency")


@pytest.mark.slow
def test_a_cut_after_64_kib_breaks_a_large_reply(anubis_proxy, redis_server):
    db = anubis_proxy(redis_server)
    r = client(db, timeout=10)
    r.set("big", b"x" * 200_000)
    db.set_faults(close_after="64KiB", direction="downstream")
    with pytest.raises(redis.ConnectionError):
        r.get("big")
    assert r.get("small") is None  # a new connection: 5 bytes of answer fit under the cut
    db.clear_faults()
    assert r.get("big") == b"x" * 200_000


@pytest.mark.slow
def test_a_one_second_blackhole_then_the_connection_closes(anubis_proxy, redis_server):
    db = anubis_proxy(redis_server)
    r = client(db, timeout=10)
    assert r.ping()
    started = time.monotonic()  # before the fault exists: its second cannot have begun earlier
    with db.faults(timeout="1s"):  # toxiproxy's timeout: nothing gets through, closed after 1 s
        with pytest.raises(redis.ConnectionError):
            r.ping()
        assert time.monotonic() - started >= 1.0
    # A dead link: the client's own timeout is all it gets.
    with db.faults(blackhole=True), pytest.raises(redis.TimeoutError):
        client(db, timeout=0.3).ping()
    assert r.ping()
