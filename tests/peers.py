"""Real peers (HAProxy, nginx, dnsmasq, openssl, curl, Chromium, tmux, redis, PostgreSQL, etcd,
systemd) for tests.

A test that talks to a peer asks for it with `need("haproxy")`. Locally a missing peer skips the test
with a message that says how to install it; under CI (`CI=true`), where `.ci/run` installs every peer,
a missing peer fails the test instead: a skip there would hide a feature that was never tested.
"""

from __future__ import annotations

import os
import shutil

import pytest

# The Debian package that brings each command, for the skip message.
PACKAGES = {
    "haproxy": "haproxy",
    "nginx": "nginx-light libnginx-mod-stream",
    "dnsmasq": "dnsmasq-base",
    "openssl": "openssl",
    "curl": "curl",
    "chromium": "chromium chromium-driver",
    "chromedriver": "chromium-driver",
    "tmux": "tmux",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "redis-benchmark": "redis-tools",
    "pg_ctl": "postgresql",
    "h2load": "nghttp2-client",
    "wrk": "wrk",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "systemd-socket-activate": "systemd",
    "systemd-analyze": "systemd",
}

# Debian keeps PostgreSQL's server programs out of PATH.
EXTRA_PATHS = ["/usr/sbin", "/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin",
               "/usr/lib/postgresql/15/bin"]  # fmt: skip


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find(command: str) -> str | None:
    """The path of `command`, looking in PATH and then where Debian puts server programs."""
    found = shutil.which(command)
    if found:
        return found
    return shutil.which(command, path=os.pathsep.join(EXTRA_PATHS))


def need(command: str) -> str:
    """The path of a peer's command; skip the test locally, fail it under CI, when it is missing."""
    path = find(command)
    if path is not None:
        return path
    package = PACKAGES.get(command, command)
    message = f"peer missing: {command!r} is not installed (apt-get install -y {package})"
    if in_ci():
        pytest.fail(message + "; under CI .ci/run installs it, so this is a failure", pytrace=False)
    pytest.skip(message)
