"""Who may give a connection filters: the makers, asked in order once per connection.

Theory of operation: right after a connection connected, connection.py asks
`filters_for` which filters (filters.py) each of its directions gets, and
chooses its relay by the answer: None keeps the socket relay (the fast
path, splice); anything else the stream relay (streams.py). Each maker looks
at the connection and returns its filters for the client → server and the
server → client directions, or None when it has nothing for this connection:
the common case, and cheap (a few attribute reads), since every plain
connection pays it. Order matters where filters meet: the makers' filters
run in this order on each direction (so a mirror copies what the faults let
through, and a bandwidth limit paces what the faults deliver).

The registry lives apart from filters.py so that a filter's module imports
the `Filter` interface without the interface's module importing it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from trioanubis.proxy.filters import Filters, fault_filters
from trioanubis.proxy.mirror import mirror_filters
from trioanubis.proxy.rates import rate_filters

if TYPE_CHECKING:
    from trioanubis.proxy.lifecycle import Connection

Maker = Callable[["Connection"], "tuple[Filters, Filters] | None"]
MAKERS: Final[list[Maker]] = [
    fault_filters,  # injected faults (filters.py, faults.py)
    rate_filters,  # bandwidth limits per connection and per client (rates.py)
    mirror_filters,  # a copy of the client's bytes to a mirror (mirror.py)
]


def filters_for(conn: Connection) -> tuple[Filters, Filters] | None:
    """Every maker's filters for this connection's directions (client → server, server → client)."""
    found: tuple[Filters, Filters] | None = None
    for maker in MAKERS:
        made = maker(conn)
        if made is not None:  # rare: tuples only then (a plain connection allocates nothing here)
            found = made if found is None else (found[0] + made[0], found[1] + made[1])
    return found if found is not None and (found[0] or found[1]) else None
