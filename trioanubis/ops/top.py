"""`anubis top`: the dashboard in a terminal, drawn with rich from the admin endpoint's `/stats`.

Theory of operation: a separate process and a plain HTTP client of the
admin API, so it needs nothing from the running balancer but its address
and token. `server_rows` turns a `/stats` document into one `Row` per
server, tolerating fields it does not know (shown as "key=value") and
fields that are missing; `render` draws rows into a rich table; both are
pure. `run_top` is the shell: once a second it fetches `/stats`, redraws,
and waits for a key (up/down or k/j move the selection, d drains, e
enables, q or Ctrl-C quits with status 0). When stdout is not a terminal it
prints one plain snapshot and exits, for scripts and pipes.

rich is an optional extra (`pip install 'trioanubis[top]'`); it is imported
only here, only when `top` runs, and its absence is one clear line, as is an
admin endpoint that cannot be reached or refuses the token. Keys are read
with termios on POSIX and msvcrt on Windows, both imported only when an
interactive session starts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from trioanubis.config import Address, Config
from trioanubis.errors import AnubisError

if TYPE_CHECKING:
    from rich.console import RenderableType

REFRESH: Final = 1.0  # seconds between two polls of /stats, like the dashboard
# One request to the admin endpoint may take this long; it is on this machine or close by.
HTTP_TIMEOUT: Final = 3.0
DEFAULT_ADMIN: Final = "http://127.0.0.1:9900"
# Least width of the plain snapshot (stdout not a terminal): wide enough that no column is cut.
SNAPSHOT_WIDTH: Final = 160
# Where `anubis top` finds the token when neither --token nor --token-file is given: an environment
# variable is not in `ps` output for other users, as a command-line argument is.
TOKEN_VARIABLE: Final = "ANUBIS_TOKEN"
# A token file bigger than this is the wrong file (as config/settings.py's token_file).
MAX_TOKEN_BYTES: Final = 4096
RICH_MISSING: Final = "anubis top needs the 'rich' package: pip install 'trioanubis[top]'"

KNOWN_SERVER: Final = frozenset({"name", "address", "state", "weight", "effective_weight", "active",
                                 "total", "bytes_in", "bytes_out", "connect_failures", "last_check",
                                 "ewma_ms", "max_connections"})  # fmt: skip
KEYS: Final = {"\x1b[A": "up", "\x1bOA": "up", "k": "up", "\x1b[B": "down", "\x1bOB": "down", "j": "down",
               "d": "drain", "e": "enable", "q": "quit", "Q": "quit", "\x03": "quit"}  # fmt: skip


class TopError(AnubisError):
    """`anubis top` cannot go on: rich missing, admin unreachable, token refused."""


# ------------------------------------------------------------------ where the admin is


def admin_target(config: Config) -> tuple[str, str]:
    """The admin endpoint's URL and token as a config file declares them."""
    if config.admin is None:
        raise TopError(f"{config.source}: no [admin] table, so there is no endpoint to watch; "
                       "add one or pass --admin URL")  # fmt: skip
    return url_of(config.admin.bind), config.admin.token


def url_of(bind: Address) -> str:
    """The URL that reaches an admin endpoint bound to `bind` from this machine."""
    host = bind.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{bind.port}"


def admin_url(text: str) -> str:
    """`--admin` checked: an http(s) URL with a host ("host:port" alone means http://host:port)."""
    url = text.strip() if "://" in text else f"http://{text.strip()}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise TopError(f"--admin {text!r}: not a URL ({exc}); expected e.g. {DEFAULT_ADMIN}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise TopError(f"--admin {text!r}: expected an http URL with a host, e.g. {DEFAULT_ADMIN}")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise TopError(f"--admin {text!r}: spaces and control characters cannot be in a URL")
    return url.rstrip("/")


def read_token_file(path: str) -> str:
    """`--token-file`: the token the file holds, surrounding whitespace removed."""
    try:
        if not os.path.isfile(path):  # checked first: opening a FIFO would wait for a writer
            raise TopError(f"--token-file {path}: not a readable regular file")
        with open(path, "rb") as file:
            raw = file.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TopError(f"--token-file {path}: cannot read it: {exc.strerror or exc}") from None
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_TOKEN_BYTES or not token or any(not 33 <= ord(c) <= 126 for c in token):
        raise TopError(f"--token-file {path}: must hold one token of visible ASCII characters "
                       f"(at most {MAX_TOKEN_BYTES} bytes)")  # fmt: skip
    return token


@dataclass(frozen=True, slots=True)
class Admin:
    """A blocking client of the admin API (top is its own process; nothing else runs in it)."""

    url: str
    token: str = ""

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise TopError(self._refusal(method, path, exc)) from None
        except http.client.HTTPException as exc:
            raise TopError(f"{self.url} did not answer like an admin endpoint: {exc!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or repr(exc)
            raise TopError(f"cannot reach the admin endpoint at {self.url}: {reason}") from None
        except ValueError as exc:
            raise TopError(f"{self.url}{path} did not answer JSON: {exc}") from None

    def _refusal(self, method: str, path: str, exc: urllib.error.HTTPError) -> str:
        if exc.code == 401:
            given = "the token" if self.token else "no token"
            return (f"the admin endpoint at {self.url} refused {given} (401); set ${TOKEN_VARIABLE}, "
                    "pass --token-file, or -c with the config that sets [admin] token")  # fmt: skip
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        return f"{method} {path}: {exc.code} {detail or exc.reason}"

    def stats(self) -> dict[str, Any]:
        document = self._call("GET", "/stats")
        if not isinstance(document, dict):
            raise TopError(f"{self.url}/stats did not answer a JSON object")
        return document

    def act(self, pool: str, server: str, action: str) -> None:
        quote = urllib.parse.quote
        self._call("POST", f"/pools/{quote(pool, safe='')}/servers/{quote(server, safe='')}/{action}", b"")


# ------------------------------------------------------------------ /stats → rows (pure)


@dataclass(frozen=True, slots=True)
class Row:
    pool: str
    name: str
    state: str
    values: dict[str, Any] = field(default_factory=dict)
    extras: str = ""


def _records(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def server_rows(document: Mapping[str, Any]) -> list[Row]:
    """One row per server (retired ones last in their pool), whatever else the document holds."""
    rows = []
    for pool in _records(document.get("pools")):
        pool_name = str(pool.get("name", "?"))
        for retired, servers in ((False, pool.get("servers")), (True, pool.get("retired"))):
            for server in _records(servers):
                state = str(server.get("state", "unknown")) + (" (retired)" if retired else "")
                extras = "  ".join(f"{k}={_plain(v)}" for k, v in server.items() if k not in KNOWN_SERVER)
                rows.append(Row(pool_name, str(server.get("name", "?")), state, dict(server), extras))
    return rows


def _plain(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _plain(value)
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def rates(before: list[Row], after: list[Row], seconds: float) -> dict[tuple[str, str], float]:
    """Connections per second per server between two polls (0 after a counter reset)."""
    if seconds <= 0:
        return {}
    old = {(r.pool, r.name): r.values.get("total") for r in before}
    result = {}
    for row in after:
        then, now = old.get((row.pool, row.name)), row.values.get("total")
        if isinstance(then, int) and isinstance(now, int):
            result[row.pool, row.name] = max(0, now - then) / seconds
    return result


STATE_STYLES: Final = {"up": "bold green", "down": "bold red", "draining": "bold yellow"}


def render(
    document: Mapping[str, Any],
    rows: list[Row],
    *,
    selected: int | None = None,
    per_second: Mapping[tuple[str, str], float] | None = None,
    status: str = "",
) -> RenderableType:
    """The whole screen: a summary line, the listeners, the servers; with a selection, keys and message."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ready = "draining" if document.get("draining") else "ready" if document.get("ready") else "not ready"
    summary = Text.assemble(("anubis top", "bold"), "  ", (ready, "green" if ready == "ready" else "red"),
                            f"  {_plain(document.get('active'))} connections open")  # fmt: skip
    listeners = Table(title="listeners", title_justify="left", expand=False)
    for column in ("listener", "bind", "pool", "accepted", "active", "rejected"):
        numeric = column in ("accepted", "active", "rejected")
        listeners.add_column(column, justify="right" if numeric else "left")
    for listener in _records(document.get("listeners")):  # text, never markup: names come from outside
        listeners.add_row(*(Text(_plain(listener.get(k))) for k in ("name", "bind", "pool", "accepted",
                                                                     "active", "rejected")))  # fmt: skip
    servers = Table(title="servers", title_justify="left", expand=False)
    for column, justify in (("pool", "left"), ("server", "left"), ("state", "left"), ("weight", "right"),
                            ("active", "right"), ("total", "right"), ("conn/s", "right"), ("in", "right"),
                            ("out", "right"), ("fails", "right"), ("EWMA ms", "right"),
                            ("last check", "left"), ("other", "left")):  # fmt: skip
        servers.add_column(column, justify=justify)  # type: ignore[arg-type]
    for index, row in enumerate(rows):
        servers.add_row(*_cells(row, (per_second or {}).get((row.pool, row.name))),
                        style="reverse" if index == selected else None)  # fmt: skip
    if selected is None:  # a snapshot: nothing to press
        return Group(summary, listeners, servers)
    keys = Text("↑/↓ or k/j select   d drain   e enable   q quit", style="dim")
    return Group(summary, listeners, servers, keys, Text(status))


def _cells(row: Row, per_second: float | None) -> list[Any]:
    from rich.text import Text

    values = row.values
    weight = _plain(values.get("weight"))
    effective = values.get("effective_weight")
    if isinstance(effective, (int, float)) and effective != values.get("weight"):
        weight += f" ({effective:.0f})"
    state = Text(row.state, style=STATE_STYLES.get(row.state.split(" ")[0], "bold"))
    cells = [row.pool, row.name, state, weight, _plain(values.get("active")), _plain(values.get("total")),
             "–" if per_second is None else f"{per_second:.1f}", _bytes(values.get("bytes_in")),
             _bytes(values.get("bytes_out")), _plain(values.get("connect_failures")),
             _plain(values.get("ewma_ms")), _plain(values.get("last_check")), row.extras]  # fmt: skip
    # Text, never markup: names, checks and extras come from the admin's answer, "[/b]" included.
    return [cell if isinstance(cell, Text) else Text(str(cell)) for cell in cells]


def parse_keys(data: str) -> list[str]:
    """The KEYS names in what the terminal sent (several keys may arrive in one read)."""
    keys = []
    while data:
        width = 3 if data.startswith("\x1b") and data[:3] in KEYS else 1
        if data[:width] in KEYS:
            keys.append(KEYS[data[:width]])
        data = data[width:]
    return keys


# ------------------------------------------------------------------ the shell


def run_top(admin: Admin) -> int:
    """`anubis top`: a live view on a terminal, one snapshot otherwise; 0 on q or Ctrl-C."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise TopError(RICH_MISSING) from None
    document = admin.stats()  # unreachable or refused: one clear line before anything is drawn
    if not sys.stdout.isatty():
        return _snapshot(document)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is a way to quit, not an error
        _interactive(admin, document)
    return 0


def _snapshot(document: Mapping[str, Any]) -> int:
    from rich.console import Console

    columns = os.environ.get("COLUMNS", "")
    width = max(SNAPSHOT_WIDTH, int(columns) if columns.isdigit() else 0)  # a pipe has no width to fit
    console = Console(file=sys.stdout, width=width, no_color=True, highlight=False, emoji=False)
    console.print(render(document, server_rows(document)))
    return 0


def _interactive(admin: Admin, document: dict[str, Any]) -> None:
    from rich.live import Live

    view = _View(admin, document)
    with _keyboard() as read_keys, Live(view.draw(), screen=True, auto_refresh=False) as live:
        due = time.monotonic() + REFRESH
        while True:
            for key in read_keys(max(0.0, due - time.monotonic())):
                if key == "quit":
                    return
                view.press(key)
            if time.monotonic() >= due:
                view.poll()
                due = time.monotonic() + REFRESH
            live.update(view.draw(), refresh=True)


class _View:
    """What the interactive screen shows and which row is selected."""

    def __init__(self, admin: Admin, document: dict[str, Any]) -> None:
        self.admin = admin
        self.document = document
        self.rows = server_rows(document)
        self.polled = time.monotonic()
        self.per_second: dict[tuple[str, str], float] = {}
        self.selected = 0
        self.status = f"watching {admin.url}"

    def poll(self) -> None:
        try:
            document = self.admin.stats()
        except TopError as exc:
            self.status = f"{exc} (retrying)"
            return
        now = time.monotonic()
        rows = server_rows(document)
        self.per_second = rates(self.rows, rows, now - self.polled)
        self.document, self.rows, self.polled = document, rows, now
        self.selected = min(self.selected, max(0, len(rows) - 1))
        if self.status.endswith("(retrying)"):
            self.status = f"watching {self.admin.url}"

    def press(self, key: str) -> None:
        if key in ("up", "down") and self.rows:
            step = -1 if key == "up" else 1
            self.selected = (self.selected + step) % len(self.rows)
        elif key in ("drain", "enable") and self.rows:
            row = self.rows[self.selected]
            try:
                self.admin.act(row.pool, row.name, key)
                self.status = f"{key}: {row.name} (pool {row.pool}) done"
            except TopError as exc:
                self.status = f"{key} {row.name} refused: {exc}"
            self.poll()

    def draw(self) -> RenderableType:
        return render(self.document, self.rows, selected=self.selected, per_second=self.per_second,
                      status=self.status)  # fmt: skip


@contextlib.contextmanager
def _keyboard() -> Iterator[Callable[[float], list[str]]]:
    """Keys without echo; yields `read_keys(timeout)` → the KEYS names typed ([] after `timeout`)."""
    if os.name == "nt":
        yield _windows_keys
        return
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # no line buffering, no echo; Ctrl-C still raises KeyboardInterrupt

    def read_keys(timeout: float) -> list[str]:
        if not select.select([fd], [], [], timeout)[0]:
            return []
        return parse_keys(os.read(fd, 64).decode(errors="replace"))

    try:
        yield read_keys
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _windows_keys(timeout: float) -> list[str]:
    import msvcrt

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if msvcrt.kbhit():  # type: ignore[attr-defined,unused-ignore]
            char = msvcrt.getwch()  # type: ignore[attr-defined,unused-ignore]
            if char in ("\x00", "\xe0"):
                char = {"H": "\x1b[A", "P": "\x1b[B"}.get(msvcrt.getwch(), "")  # type: ignore[attr-defined,unused-ignore]
            return parse_keys(char)
        time.sleep(0.05)
    return []
