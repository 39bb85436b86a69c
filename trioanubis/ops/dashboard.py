"""The dashboard's bytes: one self-contained HTML page built from files shipped in the package.

Theory of operation: `trioanubis/ops/static/` holds the page's template, its
stylesheet and script, and a vendored copy of uPlot (the charting library,
MIT, with its licence beside it). `page()` inlines them into one document the
first time it is asked for and keeps the bytes, so serving `GET /` afterwards
costs one dictionary lookup and a send; nothing is fetched from anywhere else,
and the page works offline. The page polls `/stats` once a second and calls
the existing POST endpoints; it draws what it gets and shows fields it does
not know as readable key/value text ("faults: latency 200ms, jitter 10ms", never
raw JSON), so `/stats` can grow without breaking it.

When the admin endpoint has a token, a browser's first navigation to `/`
carries none, so the admin answers 401 and the body is `login_page()`: a
small form that asks for the token, keeps it in `sessionStorage` (this tab,
this session only), fetches `/` again with `Authorization: Bearer …` and
replaces itself with the dashboard. The login page holds no data and nothing
the token protects.

Pure: no sockets, no Trio. Reading the package files is the only I/O, done
once per process on first use (about 60 KiB from the installed package).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Final

HTML_TYPE: Final = "text/html; charset=utf-8"
# The page changes only when the package does; a minute of private caching
# saves a refetch on every reload without keeping a stale page after an upgrade.
PAGE_CACHE: Final = "private, max-age=60"
# The login page depends on nothing, but caching a 401 would only get in the way.
LOGIN_CACHE: Final = "no-store"
# Every response keeps other origins from framing the page (a drain button is worth clickjacking).
PAGE_HEADERS: Final = (("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
                       ("Referrer-Policy", "no-referrer"))  # fmt: skip
PATHS: Final = ("/", "/index.html")

_INCLUDE = re.compile(r"\{\{([\w.-]+)\}\}")


def _read(name: str) -> str:
    return (resources.files("trioanubis.ops") / "static" / name).read_text(encoding="utf-8")


def _assemble(template: str) -> bytes:
    """`template` with every `{{file}}` replaced by that file's text from the static folder."""
    return _INCLUDE.sub(lambda match: _read(match[1]), _read(template)).encode()


@functools.cache
def page() -> bytes:
    """The dashboard: HTML with its CSS, its script and uPlot inlined."""
    return _assemble("dashboard.html")


@functools.cache
def login_page() -> bytes:
    """The page a browser gets with its 401: asks for the token, then loads the dashboard."""
    return _assemble("login.html")


def is_page(method: str, path: str) -> bool:
    """True for a request the dashboard answers (the query string is ignored)."""
    return method in ("GET", "HEAD") and path.split("?", 1)[0] in PATHS
