"""The exception hierarchy: everything the balancer raises on purpose is an AnubisError.

`OSError` is translated once, at the socket boundary (`connection.py`'s connecting
functions, which health checks share), into a
`ConnectFailed` that says what was being done; nothing above that layer
inspects errno values or matches error strings.
"""

from __future__ import annotations


class AnubisError(Exception):
    """Base of every error trioanubis raises deliberately."""


class ConfigError(AnubisError):
    """A configuration file or argument is invalid; the message names file, key and value."""


class ConnectFailed(AnubisError):
    """Connecting to one server failed; `reason` is a short word for logs and health state."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AttemptCancelled(AnubisError):
    """The Timer stopped a connect attempt (its timeout, or the client left)."""


class OutOfResources(ConnectFailed):
    """Connecting failed on our side (no descriptor, no buffer): not the server's fault."""


class ProxyHeaderError(AnubisError):
    """A PROXY protocol header was missing, late or invalid; `reason` is the refusal counter's name."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ChannelError(AnubisError):
    """A control-channel message between supervisor and worker was malformed or too long."""
