"""What a failed etcd call raises: one `EtcdError` subclass per thing the caller can act on.

Theory of operation: nothing else escapes the cluster package. The socket
boundary (`http.py`) turns `OSError`, `ssl.SSLError`, Trio's broken-stream
errors and h11's protocol errors into `EtcdUnreachable` (never connected, or
the connection broke); the reader (`reading.py`) turns anything malformed,
oversized or of the wrong type into `EtcdBadResponse`; an error etcd itself
answered becomes the class that says what to do about it:

- `EtcdUnreachable`: no endpoint could be reached, or the connection broke.
  Retry later (a mutable call may or may not have been applied).
- `EtcdTimeout`: an endpoint took the request and did not answer in time.
- `EtcdCompacted`: the revision asked for is gone; re-read, then watch from
  the revision of that read.
- `EtcdAuthError`: wrong user or password, no credentials while etcd wants
  them, or permission denied.
- `EtcdLeaseExpired`: the lease is gone (expired or revoked): grant a new one.
- `EtcdRequestFailed`: etcd refused the request for another reason; `code`
  is its gRPC status code.
- `EtcdBadResponse`: the answer was not what etcd sends.

Messages are one short line, lower case, naming the call and the endpoint;
text from the server is shortened and escaped (`show`) before it is put in
one, since the server may be hostile.
"""

from __future__ import annotations

from typing import Final

from trioanubis.errors import AnubisError

# The most of a server's text (an error message, a bad body) quoted in an error.
SHOWN_CHARS: Final = 120


def show(text: str | bytes) -> str:
    """Server-provided text made safe for a one-line message: decoded, escaped, shortened."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    shown = text[:SHOWN_CHARS].encode("unicode_escape").decode("ascii")
    return shown + ("…" if len(text) > SHOWN_CHARS else "")


class EtcdError(AnubisError):
    """Base of everything the etcd client raises."""


class EtcdUnreachable(EtcdError):
    """No endpoint could be reached, or the connection to it broke before a whole answer came."""


class EtcdTimeout(EtcdError):
    """An endpoint took the request but did not answer within the client's timeout."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted; `compact_revision` is the oldest one left (0 if unknown)."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdAuthError(EtcdError):
    """Authentication failed, was needed and not configured, or the user lacks the permission."""


class TokenRefused(EtcdAuthError):
    """etcd no longer accepts the token (it expired, or the member restarted): authenticate again."""


class EtcdLeaseExpired(EtcdError):
    """The lease does not exist any more (its TTL ran out, or it was revoked)."""


class EtcdRequestFailed(EtcdError):
    """etcd answered with an error not covered by a more specific class; `code` is its gRPC code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdRequestFailed):
    """The member answered that it cannot serve now (no leader, leader changed, stopping)."""


class EtcdBadResponse(EtcdError):
    """The answer was malformed, too large, too deep, or of the wrong type."""
