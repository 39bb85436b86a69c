"""A TOML table under validation: its key path, and errors that name file, key and value.

Theory of operation: the section parsers walk the file's tables as `Node`s.
A node knows where it is (`pools.web.health`), which kind of table that is
(`pools.*.health`), which file it came from and the directory its relative
paths start in. Its typed getters (`string`, `integer`, `duration`, ...) return
the value or raise a `ConfigError` shaped
``FILE: KEY.PATH: what is wrong, got VALUE``, one line whatever the value
holds: control characters are escaped, so a table name or a string with a
newline in it cannot break the line or forge another. `check_keys` rejects an
unknown key with a did-you-mean, because a misspelt timeout silently falling
back to its default is the worst kind of config bug.

The value checks themselves live in `values.py` and `checks.py` (plain values,
`ValueError`); this module only translates their reasons into key paths. A
numeric getter takes no bounds from its caller: it looks the key up in
`ranges.py` by the table's kind, so a number nobody gave a range cannot be read.
An over-long value is shown shortened (MAX_SHOWN), a huge int by its digits.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from trioanubis.config.model import Address, Network, Rate
from trioanubis.config.ranges import range_of
from trioanubis.config.values import (
    Range,
    parse_address,
    parse_bandwidth,
    parse_duration,
    parse_fraction,
    parse_integer,
    parse_network,
    parse_rate,
    parse_size,
)
from trioanubis.errors import ConfigError

T = TypeVar("T")
# A value shown in an error is cut to this many characters (its head and its tail): a
# 300-digit number or a pasted key file still makes a line one can read.
MAX_SHOWN: Final = 64


class Node:
    """A TOML table being validated; remembers its key path for error messages."""

    def __init__(self, data: object, path: str, source: str, base: Path | None = None,
                 table: str = "") -> None:  # fmt: skip
        self.path = path
        self.source = source
        self.base = base or Path.cwd()  # where the config's relative paths start
        self.table = table  # the kind of table, "pools.*.health": where ranges.py looks its numbers up
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

    def child(self, key: str, table: str | None = None) -> Node:
        """The table under `key`; its kind is this one's plus the key unless `table` says otherwise
        (a pool is a "pools.*", any faults table is "faults")."""
        kind = table if table is not None else f"{self.table}.{key}" if self.table else key
        return self.nested(self.data.get(key, {}), self.key_path(key), kind)

    def nested(self, data: object, path: str, table: str) -> Node:
        """A table inside this one (`path` is its full key path, `table` its kind), validated the same way."""
        return Node(data, path, self.source, self.base, table)

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

    def range(self, key: str) -> Range:
        """The range of the numeric `key` here (ranges.py); KeyError for a key given none."""
        return range_of(self.table, key)

    def _limit(self, key: str, *kinds: str) -> Range:
        limit = self.range(key)
        assert limit.kind in kinds, f"ranges.py files {self.table}.{key} as a {limit.kind}"
        return limit

    def integer(self, key: str, default: int) -> int:
        limit = self._limit(key, "integer")
        return self._number(key, default, lambda v: parse_integer(v, int(limit.low), int(limit.high)))

    def duration(self, key: str, default: float) -> float:
        limit = self._limit(key, "duration")
        return self._number(key, default, lambda v: parse_duration(v, limit.low, limit.high))

    def size(self, key: str) -> int:
        """A size in bytes; absent: 0."""
        limit = self._limit(key, "size", "bandwidth")
        parse = parse_bandwidth if limit.kind == "bandwidth" else parse_size
        return self._number(key, 0, lambda v: parse(v, int(limit.high)))

    def fraction(self, key: str, default: float) -> float:
        limit = self._limit(key, "fraction")
        return self._number(key, default, lambda v: parse_fraction(v, limit.low, limit.high))

    def rate(self, key: str) -> Rate | None:
        """A rate; absent: None (no limit)."""
        if key not in self.data:
            return None
        limit = self._limit(key, "rate")
        return self._number(key, None, lambda v: parse_rate(v, int(limit.high)))

    def _number(self, key: str, default: object, parse: Callable[[object], T]) -> T:
        value = self.data.get(key, default)
        try:
            return parse(value)
        except ValueError as exc:
            raise self.error(str(exc), value, key) from None

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
    """`value` as the config would spell it, shortened to MAX_SHOWN characters; a string's
    control characters escaped, so an error stays one line whatever the file holds."""
    if isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN else f"{value[:MAX_SHOWN - 16]}...{value[-13:]}"
        return '"' + "".join(_escape(ch) for ch in text) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    try:
        text = str(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits(); no parser hands one over
        return "an integer too long to show"
    if len(text) <= MAX_SHOWN:
        return text
    digits = f" ({len(text.lstrip('-'))} digits)" if isinstance(value, int) else ""
    return f"{text[:MAX_SHOWN - 16]}...{text[-13:]}{digits}"


def one_line(text: str) -> str:
    """`text` with control characters escaped (a table name may hold any character)."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    return ch if ch.isprintable() else f"\\u{ord(ch):04x}"
