"""Live toxics: toxiproxy's faults on a proxy's open connections, as filters of the stream relay.

Theory of operation: a proxy the testing kit runs (a listener and a
one-server pool: proxies.py) carries a `ToxicSet` on its pool, the chain
of toxics of each stream (upstream: client → server, downstream: server →
client), in the order they were added, as toxiproxy keeps them. Unlike a
`[faults]` table, which a connection reads once when it starts, toxics act
on the connections already open (a client's pooled connection is the one a
test wants to slow down), so:

- `live_toxics` (a maker in makers.py's `MAKERS`, put beside the faults'
  when this module is imported) gives every connection of such a pool a
  `ToxicDirection` filter per direction, whatever the set holds: its
  connections all go through the stream relay;
- each filter compares the set's `version` with the one it last saw at
  every hook and, when it changed, rebuilds its states (`ToxicState`): a
  toxic it already had keeps its state (the bytes a `limit_data` counted);
  a new or updated one gets a new state, whose `toxicity` is drawn then
  (toxiproxy draws per link each time a toxic starts running on it), and
  whose clock (`timeout`) starts then;
- a `Link` (one per connection) runs the time-based cuts in a task of the
  relay's nursery (`start`): `timeout` closes the connection `timeout` ms
  after the toxic began to act on it (0: never), `reset_peer` resets it
  `timeout` ms after the first bytes (or EOF) that reached it. Removing a
  `timeout` toxic closes the connections of its stream, active or not (its
  `Cleanup`, pinned by toxiproxy's TestTimeoutToxicClosesConnectionOnRemove).

What each toxic does to bytes (toxiproxy's units in its JSON attributes):
`latency` holds each chunk `latency` ± `jitter` ms (a uniform integer, as
toxiproxy draws it), `bandwidth` paces at `rate` KB/s (1000 bytes),
`slicer` cuts each chunk into pieces around `average_size` bytes (±
`size_variation`, toxiproxy's halving) with `delay` µs after each,
`limit_data` closes (FIN) once exactly `bytes` went through, `slow_close`
holds the EOF `delay` ms, `timeout` and `reset_peer` drop what they get.
Three types are ours: `blackhole` drops bytes and EOF (a dead link: the
`[faults]` table's), `reset_data` resets after exactly `bytes`
(`reset_after`), and `cut` closes the connection `after` ms while bytes flow
until then. `fault_toxics` turns the kit's fault keywords (a `[faults]`
table, plus `timeout`, `reset_peer`, `slow_close`, `cut_after`) into toxics.
Deviation: every cut ends the whole connection, as toxiproxy's close does,
but a plain EOF keeps the other direction flowing (toxiproxy closes both
sockets on the first EOF).

Draws (jitter, toxicity, slice sizes) come from one `random.Random` per
connection and direction, seeded from the set's `seed` and the
connection's number when a seed is given, so a failing test replays.

Everything here runs in the balancer's Trio thread: the set is changed
only there (the HTTP API, the thread handle's calls), so there is no lock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

import trio

from trioanubis.config import FaultConfig
from trioanubis.proxy.filters import Filter, Filters, TokenBucket
from trioanubis.proxy.makers import MAKERS

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection, EndState

DAY_MS: Final = 86_400_000
# A toxic's attributes as toxiproxy's JSON names them, in its Go structs' order, each with its range.
ATTRIBUTES: Final[Mapping[str, tuple[tuple[str, int], ...]]] = {
    "latency": (("latency", DAY_MS), ("jitter", DAY_MS)),  # milliseconds
    "bandwidth": (("rate", 1 << 40),),  # KB/s (1000 bytes); 0: unlimited
    "slow_close": (("delay", DAY_MS),),  # milliseconds
    "timeout": (("timeout", DAY_MS),),  # milliseconds; 0: never closes
    "reset_peer": (("timeout", DAY_MS),),  # milliseconds after the first bytes
    "slicer": (("average_size", 1 << 30), ("size_variation", 1 << 30), ("delay", DAY_MS * 1000)),  # µs
    "limit_data": (("bytes", 1 << 53),),
    "noop": (),
    "blackhole": (),  # ours: drop bytes and EOF
    "reset_data": (("bytes", 1 << 53),),  # ours: reset after exactly `bytes`
    "cut": (("after", DAY_MS),),  # ours: close `after` ms after it began, bytes flowing until then
}
STREAMS: Final = ("upstream", "downstream")


class ApiError(Exception):
    """A request toxiproxy refuses: its message and HTTP status (its `ApiError`)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@final
@dataclass(frozen=True, slots=True)
class Toxic:
    """One toxic as toxiproxy shows it; `attributes` in its units (see ATTRIBUTES)."""

    name: str
    type: str
    stream: str  # "upstream" or "downstream", in any case (toxiproxy keeps what it was given)
    toxicity: float = 1.0
    attributes: tuple[tuple[str, float], ...] = ()

    @property
    def upstream(self) -> bool:
        return self.stream.lower() == "upstream"

    def attr(self, key: str) -> float:
        return dict(self.attributes).get(key, 0)

    def as_json(self) -> dict[str, Any]:
        """Toxiproxy's shape: attributes, name, type, stream, toxicity."""
        shown = {key: _number(value) for key, value in self.attributes}
        return {"attributes": shown, "name": self.name, "type": self.type, "stream": self.stream,
                "toxicity": _number(self.toxicity)}  # fmt: skip


def _number(value: float) -> float:
    return int(value) if float(value).is_integer() else value


def parse_toxic(body: object) -> Toxic:
    """A new toxic from toxiproxy's JSON body, checked in toxiproxy's order; ApiError otherwise."""
    if not isinstance(body, dict):
        raise ApiError("bad request body: not a JSON object", 400)
    name, kind, stream = (_string(body, key, default) for key, default in
                          (("name", ""), ("type", ""), ("stream", "downstream")))  # fmt: skip
    toxicity = _toxicity(body, 1.0)
    if stream.lower() not in STREAMS:
        raise ApiError("stream was invalid, can be either upstream or downstream", 400)
    if kind not in ATTRIBUTES:
        raise ApiError("invalid toxic type", 400)
    attributes = _attributes(kind, body.get("attributes"), {})
    return Toxic(name or f"{kind}_{stream}", kind, stream, toxicity, attributes)


def updated(toxic: Toxic, body: object) -> Toxic:
    """`toxic` with what an update's body says: attributes merged, toxicity kept when absent."""
    if not isinstance(body, dict):
        raise ApiError("bad request body: not a JSON object", 400)
    toxicity = _toxicity(body, toxic.toxicity)
    attributes = _attributes(toxic.type, body.get("attributes"), dict(toxic.attributes))
    return Toxic(toxic.name, toxic.type, toxic.stream, toxicity, attributes)


def _string(body: Mapping[str, object], key: str, default: str) -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ApiError(f"bad request body: {key}: must be a string", 400)
    return value


def _toxicity(body: Mapping[str, object], default: float) -> float:
    value = body.get("toxicity", default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError("bad request body: toxicity: must be a number", 400)
    return float(value)


def _attributes(kind: str, given: object, base: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The type's attributes in order: `base` with what `given` sets (other keys ignored, as Go does)."""
    if given is not None and not isinstance(given, dict):
        raise ApiError("bad request body: attributes: must be a JSON object", 400)
    values = dict(base)
    for key, high in ATTRIBUTES[kind]:
        value = (given or {}).get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ApiError(f"bad request body: attributes.{key}: must be an integer from 0 to {high}, "
                             f"got {value!r}", 400)  # fmt: skip
        values[key] = value
    return tuple((key, values.get(key, 0)) for key, _ in ATTRIBUTES[kind])


# ---------------------------------------------------------------- the set


@final
class ToxicSet:
    """A proxy's toxics, one chain per stream, and the connections they act on."""

    def __init__(self, seed: int | None = None) -> None:
        self.chains: dict[bool, list[Toxic]] = {True: [], False: []}  # upstream?: chain
        self.version = 0  # counts changes: filters rebuild their states when it moved
        self.seed = seed
        self.connections = 0  # connections seen: each one's number seeds its draws
        self.links: set[Link] = set()  # the open connections
        self.enabled = True  # False: a connection that arrives anyway is closed at once

    def __iter__(self) -> Iterator[Toxic]:
        """Upstream's chain then downstream's, each in the order added (toxiproxy's listing)."""
        yield from self.chains[True]
        yield from self.chains[False]

    def find(self, name: str) -> Toxic | None:
        return next((toxic for toxic in self if toxic.name == name), None)

    def add(self, toxic: Toxic) -> Toxic:
        if self.find(toxic.name) is not None:
            raise ApiError("toxic already exists", 409)
        self.chains[toxic.upstream].append(toxic)
        self._changed(())
        return toxic

    def update(self, name: str, body: object) -> Toxic:
        old = self.find(name)
        if old is None:
            raise ApiError("toxic not found", 404)
        new = updated(old, body)
        chain = self.chains[old.upstream]
        chain[chain.index(old)] = new
        self._changed(())
        return new

    def remove(self, name: str) -> None:
        toxic = self.find(name)
        if toxic is None:
            raise ApiError("toxic not found", 404)
        self.chains[toxic.upstream].remove(toxic)
        self._changed((toxic,))

    def clear(self) -> None:
        removed = tuple(self)
        self.chains = {True: [], False: []}
        if removed:
            self._changed(removed)

    def close_all(self) -> None:
        """End every open connection (the proxy was disabled, deleted or moved): toxiproxy's Close."""
        for link in list(self.links):
            link.conn.end_with("fault_close")

    def _changed(self, removed: tuple[Toxic, ...]) -> None:
        self.version += 1
        closing = any(toxic.type == "timeout" for toxic in removed)
        for link in list(self.links):
            if closing:  # a removed timeout toxic closes the links it was on (toxiproxy's Cleanup)
                link.conn.end_with("fault_close")
            else:
                link.wake()

    def rng(self, number: int, upstream: bool) -> random.Random:
        if self.seed is None:
            return random.Random()
        return random.Random(f"{self.seed}:{number}:{'up' if upstream else 'down'}")


def toxics_of(conn: Connection) -> ToxicSet | None:
    pool = conn.pool
    live = pool.toxics if pool is not None else None
    return live if isinstance(live, ToxicSet) else None


def live_toxics(conn: Connection) -> tuple[Filters, Filters] | None:
    """The maker (makers.py's MAKERS): a connection of a pool with a ToxicSet gets its filters."""
    live = toxics_of(conn)
    if live is None:
        return None
    link = Link(live, conn)
    return (link.up,), (link.down,)


if live_toxics not in MAKERS:  # beside the faults: a limit paces, and a mirror copies, what they let through
    MAKERS.insert(1, live_toxics)


# ---------------------------------------------------------------- one connection


@final
class Link:
    """One connection of a proxy with toxics: its two directions and the task that cuts it on time."""

    __slots__ = ("_lot", "conn", "down", "live", "up")

    def __init__(self, live: ToxicSet, conn: Connection) -> None:
        live.connections += 1
        self.live = live
        self.conn = conn
        self.up = ToxicDirection(self, True, live.rng(live.connections, True))
        self.down = ToxicDirection(self, False, live.rng(live.connections, False))
        self._lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self._lot.unpark_all()

    async def watch(self) -> None:
        """Cut the connection when a timeout or reset_peer is due; follow the set's changes until then."""
        live, conn = self.live, self.conn
        live.links.add(self)
        try:
            if not live.enabled:
                conn.end_with("fault_close")
                return
            while True:
                self.up.sync()
                self.down.sync()
                due = min(self.up.due(), self.down.due())
                with trio.move_on_at(due):
                    await self._lot.park()
                    continue
                end = self.up.fired() or self.down.fired()
                if end is not None:
                    conn.end_with(end)
                    return
        finally:
            live.links.discard(self)


@final
@dataclass(slots=True)
class ToxicState:
    """What one toxic is doing to one direction of one connection."""

    toxic: Toxic
    active: bool  # toxicity drew it for this connection
    since: float  # when it began to act here (a timeout's clock)
    base: int = 0  # bytes delivered this way when it began (limit_data counts from there)
    first: float | None = None  # when the first bytes (or EOF) reached it (reset_peer's clock)


@final
class ToxicDirection(Filter):
    """A direction's toxics, read live from the set (see the module docstring)."""

    __slots__ = ("bucket", "delivered", "link", "rng", "slices", "states", "upstream", "version")

    def __init__(self, link: Link, upstream: bool, rng: random.Random) -> None:
        self.link = link
        self.upstream = upstream
        self.rng = rng
        self.version = -1
        self.states: tuple[ToxicState, ...] = ()
        self.bucket: TokenBucket | None = None
        self.slices: list[int] = []  # the sizes left of the chunk being sliced
        self.delivered = 0

    def start(self, conn: Connection, nursery: trio.Nursery) -> None:
        if self.upstream:  # one watcher per connection
            nursery.start_soon(self.link.watch)

    @property
    def delays(self) -> bool:
        return True  # a latency toxic may come at any time

    # ------------------------------------------------------------ states

    def sync(self) -> None:
        if self.version != self.link.live.version:
            self._rebuild()

    def _rebuild(self) -> None:
        live = self.link.live
        self.version = live.version
        old = {state.toxic.name: state for state in self.states}
        now = trio.current_time()
        states = []
        for toxic in live.chains[self.upstream]:
            state = old.get(toxic.name)
            if state is None or state.toxic is not toxic:
                base = state.base if state is not None else self.delivered  # limit_data keeps its count
                state = ToxicState(toxic, self.rng.random() < toxic.toxicity, now, base)
            states.append(state)
        self.states = tuple(states)
        rates = [s.toxic.attr("rate") for s in self._active("bandwidth") if s.toxic.attr("rate") > 0]
        rate = int(min(rates) * 1000) if rates else 0
        if rate <= 0:
            self.bucket = None
        elif self.bucket is None or self.bucket.rate != rate:
            self.bucket = TokenBucket(max(1, rate))

    def _active(self, *kinds: str) -> Iterator[ToxicState]:
        return (state for state in self.states if state.active and state.toxic.type in kinds)

    def due(self) -> float:
        """When this direction's next time-based cut is due (inf: none)."""
        due = math.inf
        for state in self._active("timeout", "reset_peer", "cut"):
            wait = state.toxic.attr("after" if state.toxic.type == "cut" else "timeout") / 1000
            if state.toxic.type in ("timeout", "cut") and (wait > 0 or state.toxic.type == "cut"):
                due = min(due, state.since + wait)
            elif state.toxic.type == "reset_peer" and state.first is not None:
                due = min(due, state.first + wait)
        return due

    def fired(self) -> EndState | None:
        now = trio.current_time()
        for state in self._active("timeout", "reset_peer", "cut"):
            wait = state.toxic.attr("after" if state.toxic.type == "cut" else "timeout") / 1000
            timed = state.toxic.type == "cut" or (state.toxic.type == "timeout" and wait > 0)
            if timed and state.since + wait <= now:
                return "fault_close"
            if state.toxic.type == "reset_peer" and state.first is not None and state.first + wait <= now:
                return "fault_reset"
        return None

    # ------------------------------------------------------------ hooks

    def on_read(self, data: bytes) -> bytes | None:
        self.sync()
        dropped = False
        for state in self._active("timeout", "reset_peer", "blackhole", "limit_data", "reset_data"):
            kind = state.toxic.type
            if kind in ("limit_data", "reset_data"):
                if self.delivered - state.base >= state.toxic.attr("bytes"):
                    self.link.conn.end_with("fault_close" if kind == "limit_data" else "fault_reset")
                    return None
                continue
            dropped = True
            if kind == "reset_peer" and state.first is None:
                state.first = trio.current_time()
                self.link.wake()
        return None if dropped else data

    def delay(self) -> float:
        total = 0.0
        for state in self._active("latency"):
            jitter = int(state.toxic.attr("jitter"))
            total += state.toxic.attr("latency") + (self.rng.randrange(-jitter, jitter) if jitter else 0)
        return max(0, total) / 1000

    def piece(self, size: int, delivered: int) -> int:
        self.sync()
        for state in self._active("slicer"):
            if not self.slices:
                self.slices = slice_sizes(size, state.toxic, self.rng)
            size = min(size, self.slices[0])
            break
        if self.bucket is not None:
            size = min(size, self.bucket.step)
        for state in self._active("limit_data", "reset_data"):
            size = min(size, max(0, int(state.toxic.attr("bytes")) - (delivered - state.base)))
        return size

    async def before_piece(self, size: int) -> None:
        if self.bucket is not None:
            await self.bucket.take(size)

    async def after_piece(self, delivered: int, more: bool) -> EndState | None:
        sent = delivered - self.delivered
        self.delivered = delivered
        for state in self._active("limit_data", "reset_data"):
            if delivered - state.base >= state.toxic.attr("bytes"):
                return "fault_close" if state.toxic.type == "limit_data" else "fault_reset"
        if self.slices:
            self.slices[0] -= sent
            if self.slices[0] <= 0:
                self.slices.pop(0)
                await self._slice_delay()
        if not more:
            self.slices.clear()
        return None

    async def _slice_delay(self) -> None:
        for state in self._active("slicer"):
            if state.toxic.attr("delay"):
                await trio.sleep(state.toxic.attr("delay") / 1_000_000)
            else:
                await trio.lowlevel.checkpoint()
            return

    async def on_eof(self) -> bool:
        self.sync()
        if any(self._active("blackhole")):
            return False
        for state in self._active("reset_peer"):
            if state.first is None:
                state.first = trio.current_time()
            await trio.sleep_until(state.first + state.toxic.attr("timeout") / 1000)
            self.link.conn.end_with("fault_reset")
            return False
        wait = sum(state.toxic.attr("delay") for state in self._active("slow_close"))
        if wait:
            await trio.sleep(wait / 1000)
        return True


def slice_sizes(size: int, toxic: Toxic, rng: random.Random) -> list[int]:
    """Toxiproxy's slicer: halve until a piece is within `size_variation` of `average_size`.

    Guarded where toxiproxy is not: an average below 1 byte counts as 1 (its
    recursion would not end), and no piece is empty.
    """
    average = max(1, int(toxic.attr("average_size")))
    variation = int(toxic.attr("size_variation"))
    sizes: list[int] = []
    pending = [size]
    while pending:
        length = pending.pop()
        if length - average <= variation or length < 2:
            sizes.append(length)
            continue
        mid = length // 2
        if variation > 0:
            mid += rng.randrange(variation * 2) - variation
        mid = min(max(mid, 1), length - 1)
        pending += [length - mid, mid]  # the left half is taken first
    return sizes


# ---------------------------------------------------------------- faults as toxics

# Keys the kit takes beside the `[faults]` table's: toxiproxy's time-based toxics and ours.
TIMED: Final = {
    "timeout": ("timeout", "timeout"),  # drop bytes, close after (0: never)
    "reset_peer": ("reset_peer", "timeout"),  # reset this long after the first bytes
    "slow_close": ("slow_close", "delay"),  # hold the EOF this long
    "cut_after": ("cut", "after"),  # ours: bytes flow, the connection closes this long after
}


def fault_toxics(faults: FaultConfig, timed: Mapping[str, float]) -> list[Toxic]:
    """The toxics a `[faults]` table (and the kit's timed keys, in seconds) stands for, named
    TYPE_STREAM; `refuse` is not one (it acts on connects: the pool's faults)."""
    kinds: list[tuple[str, tuple[tuple[str, float], ...]]] = []
    if faults.latency or faults.jitter:
        kinds.append(("latency", (("latency", faults.latency * 1000), ("jitter", faults.jitter * 1000))))
    if faults.bandwidth:
        kinds.append(("bandwidth", (("rate", faults.bandwidth / 1000),)))
    if faults.slice:
        kinds.append(("slicer", (("average_size", faults.slice), ("size_variation", 0),
                                 ("delay", faults.slice_delay * 1_000_000))))  # fmt: skip
    for kind, size in (("limit_data", faults.close_after), ("reset_data", faults.reset_after)):
        if size:
            kinds.append((kind, (("bytes", size),)))
    if faults.blackhole:
        kinds.append(("blackhole", ()))
    for key, seconds in timed.items():
        kind, attribute = TIMED[key]
        kinds.append((kind, ((attribute, seconds * 1000),)))
    streams = STREAMS if faults.direction == "both" else (faults.direction,)
    return [Toxic(f"{kind}_{stream}", kind, stream, faults.probability, attributes)
            for kind, attributes in kinds for stream in streams]  # fmt: skip
