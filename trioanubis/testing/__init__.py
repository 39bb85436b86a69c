"""The network test kit: fault-injecting proxies for tests, in three ways in.

- `trioanubis.open_balancer` (embed.py): the balancer in a Trio program's own tree;
- `proxy(upstream, **faults)` and `Kit` (thread.py): proxies in a thread of their own, for sync
  and asyncio tests, whose faults change while the client is connected (toxics.py);
- the `anubis_proxy` pytest fixture (plugin.py, loaded by the `pytest11` entry point);
- `anubis toxiproxy` (toxiproxy.py): Toxiproxy's HTTP API, for its existing clients.

Theory of operation: the pieces stack up. toxics.py is the data path (a
proxy's live toxics as stream-relay filters); proxies.py carries toxiproxy's
proxies out on a balancer through the reload path; toxiproxy.py puts its
HTTP API on them; thread.py drives the same collection from another thread;
controls.py is the embedding handle's runtime controls. Importing this
package imports none of them (their types: `__init__.pyi`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Kit", "ProxyHandle", "proxy"]


def __getattr__(name: str) -> Any:
    """The thread kit's names, imported on first use (the kit's toxics join the data path then)."""
    if name in __all__:
        from trioanubis.testing import thread

        return getattr(thread, name)
    raise AttributeError(f"module 'trioanubis.testing' has no attribute {name!r}")
