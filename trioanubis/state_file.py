"""`[settings] state_file`: the operator's runtime changes, kept across restarts.

Theory of operation: like HAProxy's `server-state-file`, but written by the
balancer itself on each change rather than dumped before a reload. The
document is JSON: a format `version`, the config file it belongs to (its
absolute path) and the commands in effect (control.py `in_effect`, each as
`encode_command` writes it). `state_document` builds it and `parse_state`
reads it back, both pure; `parse_state` raises `StateError` for a document
that is not ours to apply (corrupt, from a newer trioanubis, written for
another config file), and the balancer then logs one line and starts from
the config alone. The commands themselves are applied at start, before any
listener opens (app.py); what no longer matches the config (a pool or a
server gone) is skipped there, one line each.

`write_state` is atomic: a temporary file in the same directory, written,
flushed to disk, renamed over the old one, and the directory synced, so a
crash leaves the old document or the new one, never half of one.
`read_state` reads at most `MAX_STATE_BYTES` of a regular file. Both block:
the balancer runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from trioanubis.control import Command, CommandError, decode_command, encode_command
from trioanubis.errors import AnubisError

# The document's format; a newer one is refused rather than half understood.
STATE_VERSION: Final = 1
# Far beyond the commands a busy operator accumulates (a few hundred bytes each): a larger file is
# not one we wrote.
MAX_STATE_BYTES: Final = 16 << 20
# JSON nesting our document never reaches (json.loads recurses per level).
MAX_DEPTH: Final = 16


class StateError(AnubisError):
    """A state file that is not ours to apply: corrupt, from a newer version, or another config's."""


def config_identity(source: str) -> str:
    """The config file a state file belongs to, as written in it: its absolute path."""
    return os.path.abspath(source)


def state_document(commands: Sequence[Command], source: str) -> bytes:
    """The state file's content for `commands`, in effect under the config file `source`."""
    document = {"version": STATE_VERSION, "config": config_identity(source),
                "commands": [encode_command(c) for c in commands]}  # fmt: skip
    return json.dumps(document, indent=1).encode() + b"\n"


def parse_state(raw: bytes, source: str) -> list[Command]:
    """The commands a state file holds for the config file `source`; StateError if it is not ours."""
    document = _json(raw)
    if not isinstance(document, dict) or not isinstance(document.get("commands"), list):
        raise StateError("not a state file (no list of commands)")
    version = document.get("version")
    if version != STATE_VERSION:
        raise StateError(f"format version {version!r}, this trioanubis reads {STATE_VERSION}")
    written_for = document.get("config")
    if written_for != config_identity(source):
        raise StateError(f"written for another config file ({str(written_for)[:200]!r})")
    try:
        return [decode_command(item) for item in document["commands"]]
    except CommandError as exc:
        raise StateError(f"a command is not valid: {exc}") from None


def _json(raw: bytes) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StateError("not UTF-8") from None
    depth = 0
    for char in text:  # an upper bound of the nesting (brackets in strings count too: safe side)
        depth += (char in "[{") - (char in "]}")
        if depth > MAX_DEPTH:
            raise StateError(f"nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise StateError("not JSON") from None


def read_state(path: str) -> bytes | None:
    """The state file's bytes; None when there is none yet. OSError when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        raw = file.read(MAX_STATE_BYTES + 1)
    if len(raw) > MAX_STATE_BYTES:
        raise OSError(0, f"larger than {MAX_STATE_BYTES >> 20} MiB")
    return raw


def write_state(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data` atomically (temporary file, fsync, rename); OSError."""
    directory = str(Path(path).parent)
    fd, temporary = tempfile.mkstemp(prefix=".anubis-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (where directories can be opened: not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
