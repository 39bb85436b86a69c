"""Agent checks without I/O: reading the agent's line, its words, and what they change.

Theory of operation (HAProxy `agent-check`; its parser is `tcpcheck_agent_expect_reply`
in src/tcpcheck.c). Beside the health check, the balancer asks a small agent on the
server's host, every `interval`, how the server is doing. The agent answers one
line, ended by CR or LF, of words separated by spaces, tabs or commas, in any order
and any case; when a kind of word comes twice, the last one counts:

- `75%` (or `weight:75%`): the server's weight is 75 % of its weight (the
  configured one, or the admin's since). Capped at 100 %: an agent lowers a
  weight, it never raises one above what the operator set.
- `drain` or `maint`: the server takes no new connections (both drain here; open
  connections go on); `ready` ends a drain the agent began.
- `down`, `fail` or `stopped`: the server is down, whatever its checks say; `up`
  takes that back (the server comes up if its checks pass). Text after a `#` is
  the reason, shown in the logs (HAProxy takes `#` only at a word's start; here
  it ends the words wherever it stands).

What a reply does not say is left as it was, and the agent only ever takes back
its own doing: `ready` does not end an operator's drain, and `up` does not bring
back a server its checks or a passive ejection took down (HAProxy's rule).

`LineReader` takes bytes as they arrive and gives the line once complete; it
reads at most `MAX_LINE` bytes, so an agent that never ends its line, or sends a
huge one, costs no more than that. `parse_reply` turns a line into an
`AgentReply`. `next_status` is the state machine: from the `AgentStatus` the
pool keeps for the server (what /stats and /metrics show), one check's
`Outcome` and the server's current state, it gives the next status and the
`Actions` to carry out through the pool.

A check that fails (no connection, a timeout, a reset, a line that cannot be
read or has no word we know) changes nothing on its own: the agent only stops
influencing. After `fall` failures in a row its influence is withdrawn: weight
back to 100 %, its drain ended, its down taken back. So a broken agent never
keeps a server down or drained, and never takes one down.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Final, Literal, final

# The most of a reply we read: HAProxy's replies are a few words; this bounds what
# a misbehaving agent can make us hold.
MAX_LINE: Final = 512
# How much of a reply the logs and /stats show (printable, cut).
SHOWN: Final = 60

Result = Literal["ok", "invalid", "error"]
RESULTS: Final[tuple[Result, ...]] = ("ok", "invalid", "error")
DOWN_WORDS: Final = frozenset({"down", "fail", "stopped"})
DRAIN_WORDS: Final = frozenset({"drain", "maint"})
_PERCENT: Final = re.compile(r"(?:weight:)?([0-9]+)%")
_SEPARATORS: Final = re.compile(r"[ \t,]+")


class AgentLineError(Exception):
    """The agent's bytes are not one readable line (too long, or the connection ended first)."""


@final
class LineReader:
    """Bytes in, the agent's first line out (without its CR/LF); at most `MAX_LINE` bytes."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    @property
    def room(self) -> int:
        """How much to read next: never more than the line may still take."""
        return max(1, self.limit - len(self._buffer))

    def feed(self, data: bytes) -> bytes | None:
        """The line once it is complete; None while more is needed; AgentLineError if it is too long."""
        self._buffer += data[: self.room]
        match = re.search(rb"[\r\n]", self._buffer)
        if match is not None:
            return bytes(self._buffer[: match.start()])
        if len(self._buffer) >= self.limit:
            raise AgentLineError(f"no line end within {self.limit} bytes")
        return None

    def eof(self) -> AgentLineError:
        """What the end of the connection before a line end means (HAProxy ignores such a line)."""
        if self._buffer:
            return AgentLineError(f"incomplete line {show(bytes(self._buffer))}")
        return AgentLineError("closed without a reply")


def show(data: bytes) -> str:
    """Bytes as the logs show them: printable ASCII, the rest escaped, cut at `SHOWN` characters."""
    text = data.decode("ascii", errors="backslashreplace")
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return repr(text[:SHOWN] + ("…" if len(text) > SHOWN else ""))


@dataclass(frozen=True, slots=True)
class AgentReply:
    """What one line says; an empty field was not said."""

    health: str = ""  # "up" | "down" | "fail" | "stopped"
    admin: str = ""  # "ready" | "drain" | "maint"
    percent: int | None = None  # 0 to 100
    reason: str = ""  # after a "#"
    unknown: str = ""  # the first word we do not know (reported, the others still apply)

    @property
    def says_anything(self) -> bool:
        return bool(self.health or self.admin or self.percent is not None)


def parse_reply(line: bytes) -> AgentReply:
    """The words of one line (without its end). Never raises: any bytes make some reply."""
    text = line.decode("ascii", errors="replace")
    words, _, reason = text.partition("#")
    health = admin = unknown = ""
    percent: int | None = None
    for word in _SEPARATORS.split(words):
        lower = word.lower()
        if not word:
            continue
        if lower in DOWN_WORDS or lower == "up":
            health = lower
        elif lower in DRAIN_WORDS or lower == "ready":
            admin = lower
        elif (match := _PERCENT.fullmatch(lower)) is not None:
            percent = min(100, int(match.group(1)))
        elif not unknown:
            unknown = word
    return AgentReply(health, admin, percent, reason.strip()[:SHOWN], unknown[:SHOWN])


@dataclass(frozen=True, slots=True)
class Outcome:
    """One agent check: its result, what the agent said (or why it said nothing), and its reply."""

    result: Result
    said: str
    reply: AgentReply | None = None


def outcome_of(line: bytes) -> Outcome:
    """A line read: "ok" unless it holds only words we do not know."""
    reply = parse_reply(line)
    result: Result = "invalid" if reply.unknown and not reply.says_anything else "ok"
    return Outcome(result, show(line), reply)


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """What the agent of one server last said and what it holds the server in (kept by the pool)."""

    said: str = ""  # the last line (shown) or why there was none
    result: str = ""  # of the last check: "ok" | "invalid" | "error"
    percent: int = 100  # the weight it asks for, in percent of the server's weight
    admin: str = ""  # "drain" or "maint" while it asks for one; "" otherwise
    drained: bool = False  # the server drains because the agent drained it (so "ready" ends it)
    down: str = ""  # "down" | "fail" | "stopped" while it holds the server down, with its reason
    failures: int = 0  # checks in a row that failed
    ok: int = 0
    invalid: int = 0
    error: int = 0

    @property
    def state(self) -> str:
        """What the agent makes of the server: its down word, else its drain word, else "up"."""
        return self.down.split(" ", 1)[0] or self.admin or "up"

    @property
    def influences(self) -> bool:
        return self.percent != 100 or bool(self.admin or self.drained or self.down)

    def counts(self) -> dict[str, int]:
        return {result: getattr(self, result) for result in RESULTS}


@dataclass(frozen=True, slots=True)
class Actions:
    """What the pool must be told after one check; the weight follows `AgentStatus.percent`."""

    drain: bool | None = None  # start (True) or end (False) a drain; None: leave it
    down: str = ""  # take the server down, for this reason
    release: bool = False  # the agent took back its down: up again if the checks agree


def next_status(
    status: AgentStatus, outcome: Outcome, *, draining: bool, healthy: bool, fall: int
) -> tuple[AgentStatus, Actions]:
    """The status after one check, and what it changes (see the module's docstring)."""
    counted = dataclasses.replace(status, said=outcome.said, result=outcome.result,
                                  **{outcome.result: getattr(status, outcome.result) + 1})  # fmt: skip
    if outcome.reply is None or outcome.result != "ok":
        failed = dataclasses.replace(counted, failures=status.failures + 1)
        if failed.failures >= fall and status.influences:
            return withdraw(failed, draining=draining)
        return failed, Actions()
    reply = outcome.reply
    admin, drained, drain = _admin(status, reply, draining)
    down, take_down, release = _health(status, reply, healthy)
    percent = status.percent if reply.percent is None else reply.percent
    new = dataclasses.replace(counted, percent=percent, admin=admin, drained=drained, down=down, failures=0)
    return new, Actions(drain, take_down, release)


def withdraw(status: AgentStatus, *, draining: bool) -> tuple[AgentStatus, Actions]:
    """The agent stops influencing: full weight, its drain ended, its down taken back."""
    actions = Actions(drain=False if status.drained and draining else None, release=bool(status.down))
    return dataclasses.replace(status, percent=100, admin="", drained=False, down=""), actions


def _admin(status: AgentStatus, reply: AgentReply, draining: bool) -> tuple[str, bool, bool | None]:
    """(admin word, drained by the agent, drain action) after `reply`."""
    drained = status.drained and draining  # an operator's enable may have ended the agent's drain
    if reply.admin in DRAIN_WORDS:
        return reply.admin, drained or not draining, True if not draining else None
    if reply.admin == "ready":
        return "", False, False if drained else None
    return status.admin, drained, None


def _health(status: AgentStatus, reply: AgentReply, healthy: bool) -> tuple[str, str, bool]:
    """(down word and reason, reason to take it down now, release) after `reply`."""
    if reply.health in DOWN_WORDS:
        down = f"{reply.health} ({reply.reason})" if reply.reason else reply.health
        return down, f"agent says {down}" if healthy else "", False
    if reply.health == "up":
        return "", "", bool(status.down)
    return status.down, "", False
