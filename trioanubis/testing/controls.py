"""Runtime controls of an embedded balancer: drain, enable, weight, faults, add and remove a server.

Theory of operation: each control builds one command of the runtime control
plane (trioanubis/control.py) and hands it to `Balancer.command`, the one
path every runtime change takes (the admin API's too): it checks the command
with the config's own validators and ranges, applies it through the pool
(the single writer of server state) and keeps it in the state file when
there is one. A pool or server that does not exist is a `LookupError`
naming it; a value out of range or a name taken a `ValueError` (the
command's own message).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trioanubis.config import ConfigError, FaultConfig, parse_faults, parse_server
from trioanubis.control import (
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

if TYPE_CHECKING:
    from trioanubis.app import Balancer


async def run(balancer: Balancer, build: Any, *args: Any) -> None:
    """Build a command (its checks may refuse it) and carry it out; errors as the module says."""
    try:
        command: Command = build(*args)
        await balancer.command(command)
    except CommandError as exc:
        raise (LookupError if exc.status == 404 else ValueError)(str(exc)) from None


def _checked(parse: Any, *args: Any) -> Any:
    """A config parser's value, its ConfigError as the ValueError the controls raise."""
    try:
        return parse(*args)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


async def drain(balancer: Balancer, pool: str, server: str) -> None:
    await run(balancer, Drain, pool, server)


async def enable(balancer: Balancer, pool: str, server: str) -> None:
    await run(balancer, Enable, pool, server)


async def set_weight(balancer: Balancer, pool: str, server: str, weight: int) -> None:
    await run(balancer, SetWeight, pool, server, weight)


async def set_faults(balancer: Balancer, pool: str, server: str,
                     faults: Mapping[str, Any] | FaultConfig | None) -> None:  # fmt: skip
    """Replace the server's `[faults]` (new connections): a table as in the config, a FaultConfig,
    None to clear them (the pool's table, if any, no longer applies either)."""
    if faults is None:
        await run(balancer, ClearFaults, pool, server)
        return
    table = faults if isinstance(faults, FaultConfig) else _checked(parse_faults, dict(faults),
                                                                    f"faults of {pool}/{server}")  # fmt: skip
    await run(balancer, SetFaults, pool, server, table)


async def add_server(balancer: Balancer, pool: str, address: str, *, name: str = "", weight: int = 1) -> None:
    """Add "host:port" to the pool (healthy at once when the pool checks nothing, else once its
    health checks say so)."""
    entry = {"address": address, "weight": weight, **({"name": name} if name else {})}
    await run(balancer, AddServer, pool, _checked(parse_server, entry, f"pools.{pool}.servers[new]"))


async def remove_server(balancer: Balancer, pool: str, server: str) -> None:
    """Take the server out; its open connections go on for up to drain_timeout."""
    await run(balancer, RemoveServer, pool, server)
