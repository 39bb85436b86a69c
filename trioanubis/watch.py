"""`--watch`: notice when the config file, or a file it names, has changed, the way Kubernetes changes them.

Theory of operation: a ConfigMap or Secret volume is a directory the kubelet
updates atomically. Each key is a symlink (`anubis.toml → ..data/anubis.toml`),
`..data` is a symlink to a timestamped directory (`..2026_12_04_10_00_00.123`),
and an update writes a new timestamped directory, then renames a new `..data`
symlink over the old one and deletes the old directory. The watched path's own
`lstat` never changes; what changes is where it resolves to (its real path)
and the file found there (inode, size, modification time). So a file's
signature is its resolved path plus the `stat` of what it resolves to, and a
rewrite in place, an editor's rename over the file and a kubelet swap all
change it (a new inode may reuse an old number; the path beside it does not).

The files watched are the config file and those it reads: the admin
`token_file` (a Secret) and the TLS certificates and keys of listeners and
pools. `changed` compares two rounds of signatures on the paths both rounds
watched, so a reload that names a new file does not, by itself, count as a
change of that file. `watch` polls (one stat per file per interval: no
inotify, which would not see a symlink swap above the watched directory
either) and `watch_files` calls `on_change` once per round that saw a change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import trio

from trioanubis.config import Config

# How often --watch looks (a kubelet sync takes up to a minute; an editor's save, a second).
WATCH_INTERVAL: Final = 1.0

Signature = tuple[str, int, int, int, int] | None


def files_read_by(config: Config) -> tuple[str, ...]:
    """The files `config` was built from besides itself: token_file, TLS certificates and keys."""
    paths: list[str] = []
    if config.admin is not None and config.admin.token_file:
        paths.append(config.admin.token_file)
    for listener in config.listeners.values():
        if listener.tls is not None:
            paths += [path for pair in listener.tls.certificates for path in pair]
    for pool in config.pools.values():
        if pool.tls is not None:
            paths += [pool.tls.ca, pool.tls.cert, pool.tls.key]
    return tuple(dict.fromkeys(path for path in paths if path))


def signature(path: str) -> Signature:
    """Where `path` resolves to, and that file's inode, device, size and modification time; None if
    unreadable."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    return real, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def signatures(paths: Iterable[str]) -> dict[str, Signature]:
    return {path: signature(path) for path in paths}


def changed(before: Mapping[str, Signature], now: Mapping[str, Signature]) -> list[str]:
    """The paths watched in both rounds whose signature differs."""
    return [path for path, sig in now.items() if path in before and before[path] != sig]


async def watch_files(paths: Callable[[], Iterable[str]], seen: Mapping[str, Signature],
                on_change: Callable[[str], None]) -> None:  # fmt: skip
    """Every WATCH_INTERVAL, compare `paths()` with the last round (first: `seen`); tell `on_change` why."""
    before = dict(seen)
    while True:
        await trio.sleep(WATCH_INTERVAL)
        now = signatures(paths())
        different = changed(before, now)
        before = now
        if different:
            on_change(f"{', '.join(different)} changed")
