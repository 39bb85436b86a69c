"""The etcd client against a real etcd 3.4 (Debian's `etcd-server`), started per test on loopback.

What the client wrote is checked with `etcdctl` where it matters, and what
`etcdctl` wrote is what the watches must see. Kills, restarts and compaction
are done to the real server; a relay of our own sits in between where a test
must cut a connection or count them.
"""

from __future__ import annotations

import json
from base64 import b64decode
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.conftest import free_port, no_fd_leak, wait_until
from tests.etcdserver import EtcdServer, running_etcd, tls_files
from tests.helpers import CuttableRelay
from tests.tlscerts import Authority
from trioanubis.cluster import (
    Compare,
    Delete,
    EtcdAuthError,
    EtcdClient,
    EtcdCompacted,
    EtcdLeaseExpired,
    EtcdUnreachable,
    Event,
    EventKind,
    Get,
    GetResult,
    Put,
    Watch,
)
from trioanubis.tls.context import TlsConfigError


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with running_etcd(tmp_path) as server:
        yield server


async def ctl_get(server: EtcdServer, key: str) -> dict[str, str]:
    """Keys and values under `key` (a prefix) as etcdctl sees them."""
    result = await server.etcdctl("get", key, "--prefix", "-w", "json")
    document = json.loads(result.stdout)
    return {b64decode(kv["key"]).decode(): b64decode(kv.get("value", "")).decode()
            for kv in document.get("kvs", [])}  # fmt: skip


async def collect(watch: Watch, count: int, into: list[Event]) -> None:
    async for event in watch:
        into.append(event)
        if len(into) >= count:
            return


# --------------------------------------------------------------------------- keys


@pytest.mark.slow
async def test_put_get_delete_one_key_and_a_prefix(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        first = await client.put("/anubis/pools/web/servers/a", b"10.0.0.1:80")
        second = await client.put("/anubis/pools/web/servers/b", "10.0.0.2:80")
        await client.put("/anubis/pools/webz", "not under the prefix")
        assert second > first
        one = await client.get("/anubis/pools/web/servers/a")
        assert [(kv.key, kv.value, kv.mod_revision) for kv in one.kvs] == [
            (b"/anubis/pools/web/servers/a", b"10.0.0.1:80", first)]  # fmt: skip
        under = await client.get("/anubis/pools/web/servers/", prefix=True)
        assert [kv.key for kv in under.kvs] == [b"/anubis/pools/web/servers/a",
                                                b"/anubis/pools/web/servers/b"]  # fmt: skip
        assert under.count == 2 and under.revision >= second
        assert (await client.get("/anubis/nothing")).kvs == ()
        old = await client.get("/anubis/pools/web/servers/a", revision=first)
        assert old.kvs[0].value == b"10.0.0.1:80"
        assert await ctl_get(etcd, "/anubis/pools/web/servers/") == {
            "/anubis/pools/web/servers/a": "10.0.0.1:80",
            "/anubis/pools/web/servers/b": "10.0.0.2:80",
        }

        assert (await client.delete("/anubis/pools/web/servers/a")).deleted == 1
        assert (await client.delete("/anubis/pools/web/servers/a")).deleted == 0
        await client.put("/anubis/pools/web/servers/c", b"\x00\xff binary")
        assert (await client.get("/anubis/pools/web/servers/c")).kvs[0].value == b"\x00\xff binary"
        gone = await client.delete("/anubis/pools/web/servers/", prefix=True)
        assert gone.deleted == 2
        assert await ctl_get(etcd, "/anubis/pools/") == {"/anubis/pools/webz": "not under the prefix"}


@pytest.mark.slow
async def test_txn_compare_and_set_on_mod_revision(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        assert await client.compare_and_set("/anubis/leader", "a", 0)  # create only if absent
        assert not await client.compare_and_set("/anubis/leader", "b", 0)
        current = (await client.get("/anubis/leader")).kvs[0]
        assert not await client.compare_and_set("/anubis/leader", "b", current.mod_revision - 1)
        assert await client.compare_and_set("/anubis/leader", "b", current.mod_revision)
        assert (await ctl_get(etcd, "/anubis/leader"))["/anubis/leader"] == "b"

        stale = await client.txn([Compare("/anubis/leader", current.mod_revision)],
                                 [Put("/anubis/leader", "c")], [Get("/anubis/leader")])  # fmt: skip
        assert not stale.succeeded
        assert isinstance(stale.responses[0], GetResult) and stale.responses[0].kvs[0].value == b"b"
        newer = stale.responses[0].kvs[0].mod_revision
        done = await client.txn([Compare("/anubis/leader", newer)],
                                [Put("/anubis/leader", "d"), Delete("/anubis/other")])  # fmt: skip
        assert done.succeeded and done.responses[0] == done.revision
        assert await ctl_get(etcd, "/anubis/leader") == {"/anubis/leader": "d"}


# --------------------------------------------------------------------------- leases


@pytest.mark.slow
async def test_lease_expiry_removes_its_keys(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        lease = await client.grant_lease(1)
        await client.put("/anubis/members/me", "alive", lease=lease.id)
        assert (await client.get("/anubis/members/me")).kvs[0].lease == lease.id

        async def gone() -> bool:
            return not (await client.get("/anubis/members/me")).kvs

        with trio.fail_after(20):
            while not await gone():
                await trio.sleep(0.05)
        assert await ctl_get(etcd, "/anubis/members/") == {}
        with pytest.raises(EtcdLeaseExpired):
            await client.keep_lease_alive(lease.id)
        with pytest.raises(EtcdLeaseExpired):
            await client.put("/anubis/members/me", "again", lease=lease.id)
        await client.revoke_lease(lease.id)  # already gone: not an error


@pytest.mark.slow
async def test_keep_alive_keeps_the_keys_while_an_idle_lease_expires(etcd: EtcdServer) -> None:
    """Two leases without keep-alive expiring in turn prove two TTLs passed; the kept one is still there."""
    async with EtcdClient([etcd.endpoint]) as client:
        kept = await client.grant_lease(1)
        await client.put("/anubis/members/kept", "yes", lease=kept.id)

        async def keep_alive() -> None:
            while True:
                assert await client.keep_lease_alive(kept.id) >= 1
                await trio.sleep(0.2)  # the renewal rhythm under test, not a wait for something

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive)
            for turn in range(2):
                idle = await client.grant_lease(1)
                await client.put(f"/anubis/members/idle{turn}", "no", lease=idle.id)
                with trio.fail_after(20):
                    while (await client.get(f"/anubis/members/idle{turn}")).kvs:
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert await ctl_get(etcd, "/anubis/members/") == {"/anubis/members/kept": "yes"}
        await client.revoke_lease(kept.id)
        assert await ctl_get(etcd, "/anubis/members/") == {}


# --------------------------------------------------------------------------- watches


async def test_watch_sees_puts_and_deletes_made_by_etcdctl(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        await client.put("/anubis/pools/web/servers/old", "before the watch")
        start = (await client.get("/anubis/pools/", prefix=True)).revision + 1
        events: list[Event] = []
        async with client.watch("/anubis/pools/", start) as watch, trio.open_nursery() as nursery:
            nursery.start_soon(collect, watch, 4, events)
            await etcd.etcdctl("put", "/anubis/pools/web/servers/a", "10.0.0.1:80")
            await etcd.etcdctl("put", "/anubis/elsewhere", "not watched")
            await etcd.etcdctl("put", "/anubis/pools/web/servers/a", "10.0.0.9:80")
            await etcd.etcdctl("del", "/anubis/pools/web/servers/a")
            await etcd.etcdctl("del", "/anubis/pools/web/servers/old")
        assert [(e.kind, e.key, e.value) for e in events] == [
            (EventKind.PUT, b"/anubis/pools/web/servers/a", b"10.0.0.1:80"),
            (EventKind.PUT, b"/anubis/pools/web/servers/a", b"10.0.0.9:80"),
            (EventKind.DELETE, b"/anubis/pools/web/servers/a", b""),
            (EventKind.DELETE, b"/anubis/pools/web/servers/old", b""),
        ]
        revisions = [e.mod_revision for e in events]
        assert revisions == sorted(revisions) and revisions[0] >= start
        assert watch.next_revision == revisions[-1] + 1


@pytest.mark.slow
async def test_watch_from_now_and_events_of_one_txn(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        await client.put("/w/before", "not seen: before the watch began")
        events: list[Event] = []
        async with client.watch("/w/") as watch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, watch, 1, events)
                await wait_until(lambda: watch.next_revision > 0)  # created: it watches from here
                result = await client.txn([], [Put("/w/a", "1"), Put("/w/b", "2")])
            assert [e.key for e in events] == [b"/w/a"]
            assert watch.next_revision == result.revision  # /w/b of the same revision is still to come
            assert (await watch.__anext__()).key == b"/w/b"
            assert watch.next_revision == result.revision + 1


async def test_watch_resumes_from_its_revision_after_etcd_restarts(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint], timeout=2) as client:
        events: list[Event] = []
        watch = client.watch("/anubis/", 1)
        with pytest.raises(EtcdUnreachable):
            async with watch:
                await client.put("/anubis/a", "1")
                await collect(watch, 1, events)
                await etcd.kill()
                await collect(watch, 2, events)
        assert [e.value for e in events] == [b"1"]
        await etcd.start()
        await etcd.etcdctl("put", "/anubis/b", "2")  # made while nobody watched
        async with client.watch("/anubis/", watch.next_revision) as resumed:
            await collect(resumed, 2, events)
        assert [e.value for e in events] == [b"1", b"2"]  # nothing lost, nothing repeated


@pytest.mark.slow
async def test_watch_restarts_itself_when_its_connection_breaks(etcd: EtcdServer) -> None:
    """A relay between client and etcd cuts the watch's connection; changes made meanwhile still arrive."""
    async with trio.open_nursery() as nursery:
        relay = await CuttableRelay.start(nursery, etcd.client_port)
        async with EtcdClient([f"http://127.0.0.1:{relay.port}"]) as client:
            events: list[Event] = []
            async with client.watch("/k/", 1) as watch:
                await client.put("/k/a", "1")
                await collect(watch, 1, events)
                relay.cut()
                await wait_until(lambda: relay.active == 0)
                await etcd.etcdctl("put", "/k/b", "2")  # made while the watch had no connection
                await collect(watch, 2, events)
            assert [e.value for e in events] == [b"1", b"2"]
            assert relay.connections >= 3  # the kept-alive one, the first stream, the new one
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_compaction_is_reported_to_a_watch_and_a_read(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        first = await client.put("/c/a", "1")
        await client.put("/c/a", "2")
        latest = await client.put("/c/a", "3")
        await etcd.etcdctl("compact", str(latest))
        with pytest.raises(EtcdCompacted) as caught:
            async with client.watch("/c/", first) as watch:
                await watch.__anext__()
        assert caught.value.compact_revision == latest
        with pytest.raises(EtcdCompacted):
            await client.get("/c/a", revision=first)
        # What the caller does then: read again, watch from that read on.
        again = await client.get("/c/", prefix=True)
        assert again.kvs[0].value == b"3"
        async with client.watch("/c/", again.revision + 1) as watch:
            await client.put("/c/a", "4")
            assert (await watch.__anext__()).value == b"4"


@pytest.mark.slow
async def test_cancelling_a_watch_closes_its_socket(etcd: EtcdServer) -> None:
    async with EtcdClient([etcd.endpoint]) as client:
        await client.get("/warm")  # the kept-alive connection exists before the count
        with no_fd_leak():
            with trio.move_on_after(0.5) as scope:
                async for _ in client.watch("/quiet/"):  # no `async with`: cancellation alone closes it
                    pass  # pragma: no cover
            assert scope.cancelled_caught


# --------------------------------------------------------------------------- endpoints


@pytest.mark.slow
async def test_a_dead_first_endpoint_fails_over_to_the_next(etcd: EtcdServer) -> None:
    dead, dead2 = (f"http://127.0.0.1:{free_port()}" for _ in range(2))  # nobody listens there
    async with EtcdClient([dead, etcd.endpoint]) as client:
        await client.put("/f/a", "1")
        assert (await client.get("/f/a")).kvs[0].value == b"1"
        async with client.watch("/f/", 1) as watch:
            assert (await watch.__anext__()).value == b"1"
    async with EtcdClient([dead, dead2]) as nobody:
        with pytest.raises(EtcdUnreachable, match=r"no etcd endpoint answered.*refused.*refused"):
            await nobody.get("/f/a")


@pytest.mark.slow
async def test_unary_calls_share_one_kept_alive_connection(etcd: EtcdServer) -> None:
    async with trio.open_nursery() as nursery:
        relay = await CuttableRelay.start(nursery, etcd.client_port)
        async with EtcdClient([f"http://127.0.0.1:{relay.port}"]) as client:
            for number in range(10):
                await client.put("/r/a", str(number))
                await client.get("/r/a")
            lease = await client.grant_lease(5)
            await client.keep_lease_alive(lease.id)  # a streaming answer, read to its end
            await client.get("/r/a")
            assert relay.connections == 1
            relay.cut()  # etcd "closes" the idle connection: the next call notices and opens another
            await wait_until(lambda: relay.active == 0)
            assert (await client.get("/r/a")).kvs[0].value == b"9"
            assert relay.connections == 2
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- TLS and auth


@pytest.mark.slow
async def test_tls_with_a_ca_and_a_client_certificate(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    async with running_etcd(tmp_path, files) as server:
        async with EtcdClient([server.endpoint], ca=files.ca, cert=files.client_cert,
                              key=files.client_key) as client:  # fmt: skip
            await client.put("/t/a", "over tls")
            assert (await client.get("/t/a")).kvs[0].value == b"over tls"
            async with client.watch("/t/", 1) as watch:
                assert (await watch.__anext__()).value == b"over tls"
        bare = f"127.0.0.1:{server.client_port}"  # with a CA given, a bare endpoint is https
        async with EtcdClient([bare], ca=files.ca, cert=files.client_cert, key=files.client_key) as client:
            assert (await client.get("/t/a")).kvs[0].value == b"over tls"
        async with EtcdClient([server.endpoint], ca=files.ca) as no_cert:
            with pytest.raises(EtcdUnreachable):
                await no_cert.get("/t/a")
        (tmp_path / "other").mkdir()
        other = Authority(tmp_path / "other")
        async with EtcdClient([server.endpoint], ca=other.pair.cert, cert=files.client_cert,
                              key=files.client_key) as wrong_ca:  # fmt: skip
            with pytest.raises(EtcdUnreachable, match="certificate verify failed"):
                await wrong_ca.get("/t/a")
    with pytest.raises(TlsConfigError, match="no such file"):
        EtcdClient(["https://127.0.0.1:2379"], ca=str(tmp_path / "missing.crt"))


@pytest.mark.slow
async def test_auth_over_tls_with_a_client_certificate_wants_one_without_a_common_name(
    tmp_path: Path,
) -> None:
    """With --client-cert-auth and auth both on, etcd's HTTP gateway answers 400 to a client
    certificate that has a CommonName; the error says what to do, and one without works."""
    files = tls_files(tmp_path)
    async with running_etcd(tmp_path, files) as server:
        await server.enable_auth()
        async with EtcdClient([server.endpoint], ca=files.ca, cert=files.client_cert, key=files.client_key,
                              username="anubis", password="s3cret") as named:  # fmt: skip
            with pytest.raises(EtcdAuthError, match="a certificate whose subject has no CommonName"):
                await named.get("/anubis/a")
        async with EtcdClient([server.endpoint], ca=files.ca, cert=files.no_cn_cert, key=files.no_cn_key,
                              username="anubis", password="s3cret") as client:  # fmt: skip
            await client.put("/anubis/a", "over tls, as anubis")
            assert (await client.get("/anubis/a")).kvs[0].value == b"over tls, as anubis"


@pytest.mark.slow
async def test_auth_with_a_user_and_password_and_a_renewed_token(etcd: EtcdServer) -> None:
    await etcd.enable_auth()
    async with EtcdClient([etcd.endpoint], username="anubis", password="s3cret") as client:
        await client.put("/anubis/a", "1")
        assert (await client.get("/anubis/a")).kvs[0].value == b"1"
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await client.put("/elsewhere", "no")
        # A password change (here to the same one) makes etcd drop the user's tokens.
        token = await client._session.token()
        await etcd.etcdctl("user", "passwd", "anubis", "--interactive=false", stdin=b"s3cret\n")
        assert (await client.get("/anubis/a")).kvs[0].value == b"1"  # refused, renewed, sent again
        assert await client._session.token() != token
        token = await client._session.token()
        await etcd.etcdctl("user", "passwd", "anubis", "--interactive=false", stdin=b"s3cret\n")
        async with client.watch("/anubis/", 1) as watch:  # created and cancelled: renewed, restarted
            assert (await watch.__anext__()).value == b"1"
        assert await client._session.token() != token
        with pytest.raises(EtcdAuthError):
            async with client.watch("/elsewhere/", 1) as denied:
                await denied.__anext__()
    async with EtcdClient([etcd.endpoint], username="anubis", password="wrong") as wrong:
        with pytest.raises(EtcdAuthError, match="authentication failed"):
            await wrong.get("/anubis/a")
    async with EtcdClient([etcd.endpoint]) as anonymous:
        with pytest.raises(EtcdAuthError, match="user name is empty"):
            await anonymous.get("/anubis/a")
