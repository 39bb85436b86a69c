"""The fleet task: one per process, in the root nursery, between etcd and the balancer.

Theory of operation — the tree `Fleet.run` builds:

    fleet (one EtcdClient: kept connections, one watch connection)
    ├── first read of the prefix, before started(): before the listeners bind
    ├── follower: watch the prefix from the next revision; apply each event
    ├── writer (shared): the operator's commands, in order, to {prefix}state/…
    └── membership (shared): {prefix}members/{name} under a lease, renewed

Start: `run` reads every key under the prefix and applies it (the pools'
etcd servers first, then the state keys in revision order, since the state
names servers) before `task_status.started()`, so a late joiner serves the
current drains from its first accepted connection. If etcd does not answer
then, it starts anyway with the config alone (logged) and catches up later.

Following: the watch resumes from `next_revision` (the revision after the
last event applied) however it broke, so no change is missed and none is
applied out of order; a compacted revision means reading everything again
(servers are then synced to the read, state keys re-applied: applying a
command whose effect is already in place is skipped, `settled`).

Shared state (`shared`: the process with the admin endpoint — the single
balancer, or the workers' supervisor; a worker only follows its pools'
servers): a command the operator makes here is applied here at once
(`Balancer.command`) and queued (`publish`) for the writer, which puts it
at its state key when etcd answers, in the order made. Every instance, this
one included, applies what the watch delivers through `apply` (the same
path as its admin's commands: `Balancer.command`, or the supervisor's,
which reaches every worker), so all instances end in etcd's order. A
command that does not apply here (a server this instance does not have) is
logged once and counted.

etcd is never in the data path: nothing a connection does waits for this
task. When etcd cannot be reached every part keeps what it had, the first
failure is logged once (and the recovery once), `connected` says so, and
each part retries with backoff (`BACKOFF_START` doubling to `BACKOFF_MAX`).
A value nobody should have written (keys.py, members.py) is logged once
per key and counted in `bad_values`; the rest goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, final

import trio

from trioanubis import __version__
from trioanubis.cluster import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseExpired,
    Event,
    EventKind,
    KeyValue,
)
from trioanubis.config import ClusterConfig, ServerConfig
from trioanubis.control import (
    NO_FAULTS,
    AddServer,
    ClearFaults,
    Command,
    CommandError,
    Drain,
    Enable,
    RemoveServer,
    SetFaults,
    SetWeight,
)
from trioanubis.fleet.keys import (
    BadValue,
    Key,
    MemberKey,
    ServerKey,
    StateKey,
    decode_server,
    decode_state,
    encode_state,
    member_key,
    parse_key,
    state_key,
)
from trioanubis.fleet.members import Member, decode_member, encode_member, fleet_document, view_of
from trioanubis.fleet.servers import delete_server, literal_sockaddrs, put_server, sync_servers
from trioanubis.pool import Pool
from trioanubis.resolve import SockAddr, resolve_address

log = logging.getLogger("trioanubis.fleet")

# Retrying etcd: soon after a blip, every few seconds during an outage (and a watch that
# resumes within this of etcd's return, which is what "within 2 s" of a restart rests on).
BACKOFF_START: Final = 0.1
BACKOFF_MAX: Final = 1.0
# How often the membership value is compared with this instance's view of its servers.
MEMBER_REFRESH: Final = 0.5
# Commands kept while etcd is down: an operator's hand (or script) does not make more.
MAX_QUEUED: Final = 10_000
# Distinct keys whose bad values are logged; beyond that they are only counted.
MAX_LOGGED: Final = 256
# How long a server's name may take to resolve before it joins without an address (its health
# checks resolve it then).
RESOLVE_TIMEOUT: Final = 2.0

# Applies a command through the balancer's one path (Balancer.command, or the supervisor's).
Applier = Callable[[Command], Awaitable[object]]


def instance_name(config: ClusterConfig) -> str:
    """`[cluster] name`, else "host:pid"."""
    return config.name or f"{socket.gethostname()}:{os.getpid()}"


def settled(pools: Mapping[str, Pool], command: Command) -> bool:
    """Whether `command`'s effect is already in place here (applying it would change nothing)."""
    pool = pools.get(command.pool)
    if pool is None:
        return False
    server = pool.find(command.server)
    if isinstance(command, RemoveServer):
        return server is None
    if server is None:
        return False
    if isinstance(command, AddServer):
        return server.address == command.entry.address
    if isinstance(command, (Drain, Enable)):
        return server.draining == isinstance(command, Drain)
    if isinstance(command, SetWeight):
        return server.weight == command.weight
    if isinstance(command, SetFaults):
        return server.fault_override == command.faults
    assert isinstance(command, ClearFaults)
    return server.fault_override == NO_FAULTS


@final
class Fleet:
    """This process's part in the fleet (module docstring); `status` and `document` are what it shows."""

    def __init__(self, config: ClusterConfig, pools: Mapping[str, Pool], apply: Applier, *, shared: bool,
                 admin: Callable[[], str] = str) -> None:  # fmt: skip
        self.config = config
        self.name = instance_name(config)
        self.prefix = config.prefix
        self.pools = pools  # the balancer's own mapping: a reload adds and removes pools in it
        self.shared = shared
        self._apply = apply
        self._admin = admin
        self.client = EtcdClient(config.endpoints, ca=config.ca or None, cert=config.cert or None,
                                 key=config.key or None, username=config.username or None,
                                 password=config.password or None, timeout=config.timeout)  # fmt: skip
        self.connected = False
        self.reconnects = 0  # etcd reached again after it was lost
        self.bad_values = 0
        self.not_applied = 0  # commands from etcd that this instance refused (a server it lacks)
        self.applied = 0  # commands from etcd applied here
        self.internal_errors = 0  # bugs met applying a change (logged once per kind, with a traceback)
        self.next_revision = 0  # where the watch resumes; 0: read everything first
        self.members: dict[str, Member] = {}
        self.entries: dict[ServerKey, ServerConfig] = {}  # every server key's entry, for any pool
        self._queue: deque[Command] = deque()
        self._queued = trio.Event()
        self._logged: set[str] = set()
        self._lost_since: float | None = None  # when etcd was last lost, while it is
        self._started = time.time()

    # ------------------------------------------------------------ the surface

    def publish(self, command: Command) -> None:
        """Queue a command made here for the writer (applied here already)."""
        if len(self._queue) >= MAX_QUEUED:
            dropped = self._queue.popleft()
            log.error("cluster: %d commands wait for etcd; the oldest (%s %s/%s) is dropped", MAX_QUEUED,
                      dropped.op, dropped.pool, dropped.server)  # fmt: skip
        self._queue.append(command)
        self._queued.set()

    def status(self) -> dict[str, Any]:
        """The /stats part: this instance, its link to etcd, its counters."""
        return {"name": self.name, "endpoints": list(self.config.endpoints), "prefix": self.prefix,
                "connected": self.connected, "reconnects": self.reconnects, "bad_values": self.bad_values,
                "applied": self.applied, "not_applied": self.not_applied, "queued": len(self._queue),
                "internal_errors": self.internal_errors,
                "revision": max(0, self.next_revision - 1), "instances": len(self.members)}  # fmt: skip

    def document(self) -> dict[str, Any]:
        """The /fleet answer: the live instances as the last watch event left them, and disagreements."""
        return fleet_document(self.members.values(), instance=self.name, connected=self.connected)

    def sync_pool(self, pool: Pool) -> None:
        """A reload added `pool` or changed it: its etcd servers are the keys known now."""
        if pool.config.servers_from == "etcd":
            entries = {key.name: e for key, e in self.entries.items() if key.pool == pool.name}
            sync_servers(pool, {name: (e, literal_sockaddrs(e)) for name, e in entries.items()})

    # -------------------------------------------------------------------- run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the prefix (or fail to, logged), started(), then follow, write and stay a member."""
        async with self.client, trio.open_nursery() as nursery:
            try:
                await self._read()
            except EtcdError as exc:
                self._lost(exc, "starting with the config alone")
            task_status.started()
            nursery.start_soon(self._follow)
            if self.shared:
                nursery.start_soon(self._write)
                nursery.start_soon(self._stay_member)

    async def _read(self) -> None:
        """Everything under the prefix: the pools' etcd servers, then the state in revision order."""
        found = await self.client.get(self.prefix, prefix=True)
        self._connected()
        keyed = [(parse_key(self.prefix, kv.key), kv) for kv in found.kvs]
        self.entries = {}
        for key, kv in keyed:
            if isinstance(key, ServerKey):
                self._take_entry(key, kv.value)
        for pool in self.pools.values():
            if pool.config.servers_from == "etcd":
                entries = {k.name: e for k, e in self.entries.items() if k.pool == pool.name}
                sync_servers(pool, {name: (e, await self._addresses(e)) for name, e in entries.items()})
        if self.shared:
            self.members = {}
            for key, kv in sorted(keyed, key=lambda pair: pair[1].mod_revision):
                if isinstance(key, (StateKey, MemberKey)):
                    await self._on_put(key, kv)
        self.next_revision = found.revision + 1

    async def _follow(self) -> None:
        backoff = BACKOFF_START
        while True:
            try:
                if self.next_revision == 0:
                    await self._read()
                elif not self.connected:
                    await self.client.get(member_key(self.prefix, self.name))  # is it back?
                    self._connected()
                async with self.client.watch(self.prefix, self.next_revision) as watch:
                    async for event in watch:
                        backoff = BACKOFF_START
                        self._connected()
                        await self._on_event(event)
                        self.next_revision = watch.next_revision
            except EtcdCompacted:
                log.warning("cluster: revision %d was compacted; reading every key again", self.next_revision)
                self.next_revision = 0
            except EtcdError as exc:
                self._lost(exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX)

    # ---------------------------------------------------------------- applying

    async def _on_event(self, event: Event) -> None:
        """Apply one change; whatever it raises beyond what values are expected to (a bug) is logged
        with its traceback once per place and counted: no value stops the fleet task or the process."""
        try:
            await self._apply_event(event)
        except Exception as exc:  # the boundary; trio.Cancelled is a BaseException and passes
            self.internal_errors += 1
            self._once(f"internal {type(exc).__name__}", "cluster: internal error applying %s: %r",
                       event.key.decode(errors="replace"), exc, exc_info=exc)  # fmt: skip

    async def _apply_event(self, event: Event) -> None:
        key = parse_key(self.prefix, event.key)
        if key is None:
            return
        if event.kind is EventKind.PUT:
            kv = KeyValue(event.key, event.value, event.create_revision, event.mod_revision, event.version,
                          event.lease)  # fmt: skip
            await self._on_put(key, kv)
        elif isinstance(key, ServerKey):
            self.entries.pop(key, None)
            pool = self._etcd_pool(key.pool)
            if pool is not None:
                delete_server(pool, key.name)
        elif isinstance(key, MemberKey):
            self.members.pop(key.name, None)
        # a state key deleted: the state it set stays (the key held its last word, not a lease on it)

    async def _on_put(self, key: Key, kv: KeyValue) -> None:
        try:
            if isinstance(key, ServerKey):
                entry = self._take_entry(key, kv.value)
                pool = self._etcd_pool(key.pool)
                if entry is not None and pool is not None:
                    put_server(pool, entry, await self._addresses(entry))
            elif isinstance(key, StateKey) and self.shared:
                await self._carry_out(decode_state(self.prefix, key, kv.value))
            elif isinstance(key, MemberKey) and self.shared:
                where = kv.key.decode(errors="replace")
                self.members[key.name] = decode_member(where, key.name, kv.value)
        except BadValue as exc:
            self._bad(str(exc))

    def _take_entry(self, key: ServerKey, value: bytes) -> ServerConfig | None:
        try:
            entry = self.entries[key] = decode_server(self.prefix, key, value)
        except BadValue as exc:
            self._bad(str(exc))
            return None
        return entry

    def _etcd_pool(self, name: str) -> Pool | None:
        pool = self.pools.get(name)
        return pool if pool is not None and pool.config.servers_from == "etcd" else None

    async def _carry_out(self, command: Command) -> None:
        if settled(self.pools, command):
            return
        try:
            await self._apply(command)
        except CommandError as exc:
            self.not_applied += 1
            self._once(f"not applied {command!r}", "cluster: %s of %s/%s from etcd not applied here: %s",
                       command.op, command.pool, command.server, exc)  # fmt: skip
        else:
            self.applied += 1

    async def _addresses(self, entry: ServerConfig) -> list[SockAddr] | None:
        found = literal_sockaddrs(entry)
        if found is not None:
            return found
        with trio.move_on_after(RESOLVE_TIMEOUT):
            try:
                return await resolve_address(entry.address)
            except OSError:
                pass
        return None  # the health checks resolve it

    # ---------------------------------------------------------------- writing

    async def _write(self) -> None:
        """The queued commands to their state keys, oldest first; each stays queued until etcd took it."""
        backoff = BACKOFF_START
        while True:
            if not self._queue:
                self._queued = trio.Event()
                await self._queued.wait()
                continue
            command = self._queue[0]
            try:
                await self.client.put(state_key(self.prefix, command), encode_state(command))
            except EtcdError as exc:
                self._lost(exc)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX)
                continue
            self._connected()
            self._queue.popleft()
            backoff = BACKOFF_START

    def _member(self) -> Member:
        return Member(self.name, __version__, os.getpid(), self._started, self._admin(), view_of(self.pools))

    async def _stay_member(self) -> None:
        """Keep {prefix}members/{name} under a lease: put when the view changes, renewed every TTL / 3."""
        key, ttl = member_key(self.prefix, self.name), self.config.ttl
        lease, written, renew_at, backoff = 0, b"", 0.0, BACKOFF_START
        try:
            while True:
                try:
                    if lease == 0:
                        lease, written = (await self.client.grant_lease(ttl)).id, b""
                        renew_at = trio.current_time() + ttl / 3
                    value = encode_member(self._member())
                    if value != written:
                        await self.client.put(key, value, lease=lease)
                        written = value
                    if trio.current_time() >= renew_at:
                        await self.client.keep_lease_alive(lease)
                        renew_at = trio.current_time() + ttl / 3
                    backoff = BACKOFF_START
                    await trio.sleep(MEMBER_REFRESH)
                except EtcdLeaseExpired:
                    lease = 0  # etcd was away longer than the TTL: register again
                except EtcdError as exc:
                    self._lost(exc)
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX)
        finally:
            await self._leave(lease)

    async def _leave(self, lease: int) -> None:
        """Stopping: revoke the lease so the others see this instance go now, not a TTL later."""
        if not lease:
            return
        shielded = trio.CancelScope(shield=True)
        with shielded, trio.move_on_after(min(1.0, self.config.timeout)), contextlib.suppress(EtcdError):
            await self.client.revoke_lease(lease)

    # ---------------------------------------------------------------- reporting

    def _connected(self) -> None:
        if self.connected:
            return
        self.connected = True
        if self._lost_since is not None:
            self.reconnects += 1
            log.warning("cluster: etcd reachable again after %.1fs; resuming from revision %d",
                        time.monotonic() - self._lost_since, self.next_revision)  # fmt: skip
            self._lost_since = None

    def _lost(self, exc: EtcdError, doing: str = "serving with the last state") -> None:
        if self._lost_since is None:
            log.warning("cluster: etcd unreachable (%s); %s, retrying", exc, doing)
            self._lost_since = time.monotonic()
        self.connected = False

    def _bad(self, message: str) -> None:
        self.bad_values += 1
        self._once(message.split(":", 1)[0], "cluster: %s; ignored", message)

    def _once(self, what: str, template: str, *args: object, exc_info: BaseException | None = None) -> None:
        if what in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(what)
            log.warning(template + " (logged once)", *args, exc_info=exc_info)
