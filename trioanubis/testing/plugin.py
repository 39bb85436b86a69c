"""The pytest plugin (entry point `pytest11`): the `anubis_proxy` fixture.

Theory of operation: the fixture is a factory. Its first call in a test
starts a `Kit` (thread.py: a balancer in a thread of its own); each call
makes a proxy to the upstream it is given and returns its `ProxyHandle`
(`.host`, `.port`, `.address`, `set_faults`, `clear_faults`, `faults(...)`,
`add_toxic`, `down()`, ...); the kit, its proxies and their connections end
with the test. Importing this module imports nothing of the balancer, so
a test session that never asks for the fixture pays nothing for it.

    def test_slow_database(anubis_proxy):
        db = anubis_proxy("127.0.0.1:5432", latency="200ms")
        ...
        db.set_faults(close_after="64KiB")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from trioanubis.testing.thread import Kit, ProxyHandle


class ProxyFactory(Protocol):
    """What `anubis_proxy` is: `anubis_proxy(upstream, **faults)`."""

    def __call__(self, upstream: str, *, listen: str = "127.0.0.1:0", name: str = "",
                 seed: int | None = None, **faults: Any) -> ProxyHandle: ...  # fmt: skip


@pytest.fixture
def anubis_proxy() -> Iterator[ProxyFactory]:
    """A factory of fault-injecting proxies: `anubis_proxy("127.0.0.1:6379", latency="100ms")`."""
    kits: list[Kit] = []

    def make(upstream: str, *, listen: str = "127.0.0.1:0", name: str = "", seed: int | None = None,
             **faults: Any) -> ProxyHandle:  # fmt: skip
        if not kits:
            from trioanubis.testing.thread import Kit

            kits.append(Kit().__enter__())
        return kits[0].proxy(upstream, listen=listen, name=name, seed=seed, **faults)

    try:
        yield make
    finally:
        for kit in kits:
            kit.close()
