"""trioanubis: a TCP (layer 4) load balancer on Trio, and a network test kit.

The public API (typed, checked with mypy --strict by tests/test_testing_api.py):

- `open_balancer(config, *, io=None)`: run a balancer inside the caller's Trio
  tree; yields a `BalancerHandle` (bound addresses, runtime controls);
- `trioanubis.testing.proxy(upstream, **faults)`, `trioanubis.testing.Kit`:
  fault-injecting proxies for sync and asyncio code;
- the `anubis_proxy` pytest fixture (entry point `pytest11`);
- `Config`, `Address`, `ConfigError`, `AnubisError`: what those take and raise.

Names are imported on first use, so `import trioanubis` stays cheap; their types are declared in
`__init__.pyi` (what type checkers read), which keeps this package's import graph free of circles.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Address", "AnubisError", "BalancerHandle", "Config", "ConfigError", "__version__", "compiled",
           "open_balancer"]  # fmt: skip

_WHERE = {
    "Address": "trioanubis.config", "Config": "trioanubis.config", "ConfigError": "trioanubis.config",
    "AnubisError": "trioanubis.errors", "BalancerHandle": "trioanubis.testing.embed",
    "open_balancer": "trioanubis.testing.embed",
}  # fmt: skip


def compiled() -> bool:
    """True when the data path runs as mypyc's extensions (setup.py), False when it is pure Python."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from trioanubis.proxy import relay

    return (relay.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))


def __getattr__(name: str) -> Any:
    """The public names, imported on first use."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'trioanubis' has no attribute {name!r}")
