"""Between accept and connect: trusted proxies, the PROXY header, allow/deny, per-client limits.

Theory of operation: a listener with none of these options set never calls
into this module (its accept path stays as it was). With any of them, the
listener owns one `Admission`, which lives as long as the listener (a reload
reconfigures it, keeping its counters and its table of clients), and:

- without `accept_proxy`, `at_accept` judges the client as accept() reported
  it, synchronously, before the connection gets a task: allow/deny (deny
  wins; an empty allow list allows everyone), then the per-client limits
  (`ClientTable`);
- with `accept_proxy`, `at_accept` only checks that the peer is in
  `proxy_trusted`; the connection's first stage (header_io.py's `read_header`)
  reads the header within `proxy_timeout` and judges the client the header
  names the same way. The admitted connection continues as any other with
  that client as its address: the access log, `/stats`, `source_hash`, the
  limits and `send_proxy` all see the real client.

A refused client is closed before any server is contacted, counted by reason
(`refused`, shown in /stats and /metrics) and logged at most once per client
per minute (`LogOnce`). An admitted connection is counted per client: the
address counted is the connection's to give back (`release`), which it does
whenever it ends (lifecycle.py).
"""

from __future__ import annotations

import logging
from typing import Final, final

from trioanubis.config import ListenerConfig
from trioanubis.proxy.clients import COUNTED, LOG_INTERVAL, NOT_COUNTED, ClientTable, LogOnce, NetworkSet

log = logging.getLogger("trioanubis.admission")

# Why a client was refused: the label values of anubis_listener_refused_total.
REASONS: Final = ("denied", "untrusted", "proxy_header", "proxy_timeout", "client_connections",
                  "client_rate")  # fmt: skip
# Clients with the most open connections that /stats lists per listener.
BUSIEST_SHOWN: Final = 20


@final
class Admission:
    """Who may connect to one listener, and how much."""

    def __init__(self, listener: str, config: ListenerConfig) -> None:
        self.listener = listener
        self.refused = dict.fromkeys(REASONS, 0)
        self.clients = ClientTable()
        self.logged = LogOnce()
        self._flood_warned = -LOG_INTERVAL
        self.configure(config)

    def configure(self, config: ListenerConfig) -> None:
        """Apply a listener's (new) options; counters and open-connection counts carry over."""
        self.config = config
        self.accept_proxy = config.accept_proxy
        self.proxy_timeout = config.proxy_timeout
        self.trusted = NetworkSet(config.proxy_trusted)
        self.allow = NetworkSet(config.allow)
        self.deny = NetworkSet(config.deny)
        rate = config.rate_per_client
        self.clients.configure(config.max_connections_per_client,
                               None if rate is None else (rate.count, rate.period))  # fmt: skip
        # Open connections are counted per client when a limit needs it, or to show real clients.
        self.counting = bool(config.accept_proxy or config.max_connections_per_client or rate)

    def at_accept(self, host: str, now: float) -> str | None:
        """The check right after accept(): the proxy must be trusted, or the client admitted (see `admit`)."""
        if not self.accept_proxy:
            return self.admit(host, now)
        if host in self.trusted:
            return ""
        self.refuse(host, "untrusted", now, "not in proxy_trusted")
        return None

    def admit(self, host: str, now: float) -> str | None:
        """Allow/deny, then the per-client limits: None if refused, else the address counted ("" if none).

        The address counted is a slot the connection gives back with `release`.
        """
        if (self.deny and host in self.deny) or (self.allow and host not in self.allow):
            self.refuse(host, "denied", now, "denied by allow/deny")
            return None
        if not self.counting:
            return ""
        answer = self.clients.admit(host, now)
        if answer == COUNTED:
            return host
        if answer == NOT_COUNTED:
            return ""
        self.refuse(host, answer, now, self._describe_limit(answer))
        return None

    def release(self, host: str) -> None:
        """A connection this admission counted for `host` has ended."""
        self.clients.release(host)

    def refuse(self, host: str, reason: str, now: float, why: str) -> None:
        """Count a refusal and log it, at most once per client per minute."""
        self.refused[reason] += 1
        if self.logged.should_log(host, now):
            log.warning("listener %s: refused %s: %s", self.listener, host, why)
        elif self.logged.suppressed and now - self._flood_warned >= LOG_INTERVAL:
            self._flood_warned = now
            log.warning("listener %s: refusing clients from more than %d addresses a minute; further "
                        "refusals are counted (/metrics) but not logged", self.listener,
                        self.logged.capacity)  # fmt: skip

    def _describe_limit(self, reason: str) -> str:
        if reason == "client_connections":
            return f"over max_connections_per_client ({self.config.max_connections_per_client})"
        return f"over rate_per_client ({self.config.rate_per_client})"

    def stats(self) -> dict[str, object]:
        """This listener's part of /stats."""
        return {
            "refused": dict(self.refused),
            "refusals_not_logged": self.logged.suppressed,
            "tracked_clients": len(self.clients),
            "untracked_clients": self.clients.untracked,
            "busiest_clients": [{"client": c, "active": n} for c, n in self.clients.busiest(BUSIEST_SHOWN)],
        }
