"""A TOML table under validation: its key path, and errors that name file, key and value.

Theory of operation: the section parsers walk the file's tables as `Node`s.
A node knows where it is (`pools.web.health`), which file it came from and the
directory its relative paths start in. Its typed getters (`string`, `integer`,
`duration`, ...) return the value or raise a `ConfigError` shaped
``FILE: KEY.PATH: what is wrong, got VALUE``, one line whatever the value
holds: control characters are escaped, so a table name or a string with a
newline in it cannot break the line or forge another. `check_keys` rejects an
unknown key with a did-you-mean, because a misspelt timeout silently falling
back to its default is the worst kind of config bug.

The value checks themselves live in `values.py` and `checks.py` (plain values,
`ValueError`); this module only translates their reasons into key paths.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from trioanubis.config.model import Address, Network, Rate
from trioanubis.config.values import parse_address, parse_duration, parse_network, parse_rate, parse_size
from trioanubis.errors import ConfigError


class Node:
    """A TOML table being validated; remembers its key path for error messages."""

    def __init__(self, data: object, path: str, source: str, base: Path | None = None) -> None:
        self.path = path
        self.source = source
        self.base = base or Path.cwd()  # where the config's relative paths start
        if not isinstance(data, Mapping):
            raise self.error("must be a table", data)
        self.data: Mapping[str, Any] = data

    def error(self, message: str, value: object = None, key: str | None = None) -> ConfigError:
        where = self.key_path(key) if key is not None else self.path
        got = "" if value is None else f", got {show_value(value)}"
        return ConfigError(one_line(f"{self.source}: {where or '(top level)'}: {message}{got}"))

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known_list = ", ".join(known)
                raise ConfigError(one_line(
                    f"{self.source}: {self.key_path(key)}: unknown key{hint}; "
                    f"known keys here: {known_list}"
                ))

    def child(self, key: str) -> Node:
        return self.nested(self.data.get(key, {}), self.key_path(key))

    def nested(self, data: object, path: str) -> Node:
        """A table inside this one (`path` is its full key path), validated the same way."""
        return Node(data, path, self.source, self.base)

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise self.error("must be a string", value, key)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(f"must be one of {', '.join(map(repr, choices))}", value, key)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error("must be true or false", value, key)
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"≥ {minimum}"
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < minimum or (maximum is not None and value > maximum):
            raise self.error(f"must be an integer {bound}", value, key)
        return int(value)

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.data.get(key, default)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None
        if positive and seconds <= 0:
            raise self.error("must be greater than zero", value, key)
        return seconds

    def size(self, key: str, parse: Callable[[object], int] = parse_size) -> int:
        value = self.data.get(key, 0)
        try:
            return parse(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None

    def fraction(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise self.error("must be a number from 0 to 1", value, key)
        return float(value)

    def networks(self, key: str) -> tuple[Network, ...]:
        """A list of CIDRs; each bad entry is named by its index (`allow[2]`)."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error("must be a list of CIDRs like [\"10.0.0.0/8\", \"::1/128\"]", value, key)
        networks = []
        for index, item in enumerate(value):
            try:
                networks.append(parse_network(item))
            except ValueError as exc:
                raise self.error(str(exc), item, f"{key}[{index}]") from None
        return tuple(networks)

    def rate(self, key: str) -> Rate | None:
        if key not in self.data:
            return None
        value = self.data[key]
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None

    def checked(self, key: str, value: str, check: Callable[[str], None]) -> str:
        """`value` (the string under `key`) once `check` accepted it; its ValueError as the reason."""
        try:
            check(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None
        return value

    def address(self, key: str, *, allow_any_host: bool = False, default: str = "") -> Address:
        if key not in self.data and not default:
            raise self.error("is required (\"host:port\")", key=key)
        value = self.data.get(key, default)
        try:
            return parse_address(value, allow_any_host=allow_any_host)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None


_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def show_value(value: object) -> str:
    """`value` as the config would spell it; a string's control characters escaped, so an
    error stays one line whatever the file holds."""
    if isinstance(value, str):
        return '"' + "".join(_escape(ch) for ch in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def one_line(text: str) -> str:
    """`text` with control characters escaped (a table name may hold any character)."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    return ch if ch.isprintable() else f"\\u{ord(ch):04x}"
