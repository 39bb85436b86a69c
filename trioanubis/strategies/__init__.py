"""Balancing strategies and their registry.

`resolve_strategy(name)` maps a config name (or "package.module:Class" for a
strategy of the user's own) to a class; `make_strategy(name)` instantiates it;
`check_strategy` is what config validation runs, so that a name it accepts
always makes a working strategy later. The interface every strategy
implements is described in `base.py`.

A pool's `balance_factor` (bounded loads, `bounded.py`) is passed to the
constructor as the keyword `balance_factor`, and only when it is set: hash
strategies take it (`source_hash`, or a class of the user's own that accepts
the keyword); `check_balance_factor_for` refuses it for the others.

A custom module is looked for in the config file's directory first: that
directory is put at the front of `sys.path` only while the module is being
imported, then taken out again. The imported module stays in `sys.modules`,
so later `make_strategy` calls (start-up, reload) find it without the path.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trioanubis.errors import ConfigError
from trioanubis.strategies.base import ServerView, Strategy
from trioanubis.strategies.least_connections import LeastConnections
from trioanubis.strategies.least_time import LeastTime
from trioanubis.strategies.round_robin import RoundRobin
from trioanubis.strategies.source_hash import SourceHash
from trioanubis.strategies.weighted_random import PowerOfTwo, WeightedRandom

__all__ = ["STRATEGIES", "ServerView", "Strategy", "StrategyError", "check_balance_factor_for",
           "check_strategy", "make_strategy", "resolve_strategy"]  # fmt: skip

STRATEGIES: dict[str, Callable[..., Any]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "least_time": LeastTime,
    "random": WeightedRandom,
    "power_of_two": PowerOfTwo,
    "source_hash": SourceHash,
}


class StrategyError(ConfigError):
    """A strategy name that names no strategy."""


def resolve_strategy(name: str, search_dir: str | Path | None = None) -> Callable[..., Any]:
    """The class for a built-in name or a "module:Class" path; StrategyError otherwise.

    `search_dir` (the config file's directory) is searched before `sys.path`.
    """
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        known = ", ".join(STRATEGIES)
        raise StrategyError(f"unknown strategy (known: {known}, or \"package.module:Class\")")
    module_name, _, attr = name.partition(":")
    try:
        with _importing_from(search_dir):
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise StrategyError(f"cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise StrategyError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(cls, type) or not callable(getattr(cls, "pick", None)):
        raise StrategyError(f"{name} is not a class with a pick(servers, client_key, usable) method")
    if getattr(cls, "_is_protocol", False):
        raise StrategyError(f"{name} is a typing.Protocol (an interface); name a class that "
                            "implements it")  # fmt: skip
    return cls


def check_strategy(name: str, search_dir: str | Path | None = None) -> None:
    """Resolve `name` and build one instance, as the pool will; StrategyError if that fails."""
    cls = resolve_strategy(name, search_dir)
    try:
        instance = cls()
    except Exception as exc:  # the user's constructor may fail in any way
        raise StrategyError(f"{name}() cannot be instantiated: {exc}") from None
    if not callable(getattr(instance, "pick", None)):
        raise StrategyError(f"{name}() has no pick(servers, client_key, usable) method")


@contextmanager
def _importing_from(directory: str | Path | None) -> Iterator[None]:
    """Put `directory` first on sys.path for the duration of one import."""
    if directory is None:
        yield
        return
    entry = os.path.abspath(directory)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # the file may be newer than the finders' listing
    try:
        yield
    finally:
        sys.path.remove(entry)  # the first occurrence: the one inserted above


def make_strategy(name: str, balance_factor: float = 0.0) -> Strategy:
    """An instance of strategy `name`; a non-zero `balance_factor` goes to its constructor."""
    cls = resolve_strategy(name)
    instance: Strategy = cls(balance_factor=balance_factor) if balance_factor else cls()
    return instance


def check_balance_factor_for(name: str, balance_factor: float, search_dir: str | Path | None = None) -> None:
    """StrategyError unless strategy `name` can be built with this `balance_factor` (0: always)."""
    if not balance_factor:
        return
    cls = resolve_strategy(name, search_dir)
    try:
        cls(balance_factor=balance_factor)
    except TypeError:
        raise StrategyError(f"strategy {name!r} does not bound loads: balance_factor needs a hash "
                            "strategy (source_hash, or a class whose constructor takes balance_factor)"
                            ) from None  # fmt: skip
    except Exception as exc:  # the user's constructor may fail in any way
        raise StrategyError(f"{name}(balance_factor={balance_factor:g}) cannot be instantiated: {exc}"
                            ) from None  # fmt: skip
