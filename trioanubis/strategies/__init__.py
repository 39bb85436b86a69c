"""Balancing strategies and their registry.

`resolve_strategy(name)` maps a config name (or "package.module:Class" for a
strategy of the user's own) to a class; `make_strategy(name)` instantiates it.
The interface every strategy implements is described in `base.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from trioanubis.errors import ConfigError
from trioanubis.strategies.base import ServerView, Strategy
from trioanubis.strategies.least_connections import LeastConnections
from trioanubis.strategies.least_time import LeastTime
from trioanubis.strategies.round_robin import RoundRobin
from trioanubis.strategies.source_hash import SourceHash
from trioanubis.strategies.weighted_random import PowerOfTwo, WeightedRandom

__all__ = ["STRATEGIES", "ServerView", "Strategy", "StrategyError", "make_strategy",
           "resolve_strategy"]  # fmt: skip

STRATEGIES: dict[str, Callable[[], Any]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "least_time": LeastTime,
    "random": WeightedRandom,
    "power_of_two": PowerOfTwo,
    "source_hash": SourceHash,
}


class StrategyError(ConfigError):
    """A strategy name that names no strategy."""


def resolve_strategy(name: str) -> Callable[[], Any]:
    """The class for a built-in name or a "module:Class" path; StrategyError otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        known = ", ".join(STRATEGIES)
        raise StrategyError(f"unknown strategy (known: {known}, or \"package.module:Class\")")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise StrategyError(f"cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise StrategyError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(cls) or not callable(getattr(cls, "pick", None)):
        raise StrategyError(f"{name} is not a class with a pick(servers, client_key, usable) method")
    return cls  # type: ignore[no-any-return]


def make_strategy(name: str) -> Strategy:
    instance: Strategy = resolve_strategy(name)()
    return instance
