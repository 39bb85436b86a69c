"""Every number a config holds, with its kind and its range: the one table the parsers read.

Theory of operation: `Node`'s numeric getters (`duration`, `integer`, `size`,
...) look the key up here by the kind of table it is in (`pools.*`,
`pools.*.health`, `faults`, ...), parse the value with the validator for its
kind (`values.py`) and refuse anything outside the range, naming the key path.
A numeric key missing here fails every parse of its table, so no number is
read without a range; `tests/test_config_ranges.py` checks that every numeric
key of the reference anubis.toml is here, and feeds each one its extremes.

The ranges are generous to an HAProxy or nginx user and stop short of what
would overflow or starve something: a timeout is at most a day (HAProxy's
ceiling is 2^31-1 ms, 24.8 days), a timeout that must be positive at least a
millisecond (HAProxy's resolution), a count of connections at most ten
million, a weight at most a million, an injected delay at most a minute.
README "Ranges" and the comments in anubis.toml say the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from trioanubis.config.values import DAY, MAX_SIZE, Range

# A timeout that must be positive: from a millisecond to a day.
TIMEOUT: Final = Range("duration", 0.001, DAY)
# A wait that 0 turns off (or makes immediate): up to a day.
WAIT: Final = Range("duration", 0.0, DAY)
# Connections, open or held: ten million is ~20 million descriptors, beyond a default
# Linux fs.nr_open (2^20) tenfold.
MAX_CONNECTIONS: Final = 10_000_000
CONNECTIONS: Final = Range("integer", 0, MAX_CONNECTIONS)
# A server's weight, in the file and through the admin API.
MAX_WEIGHT: Final = 1_000_000
WEIGHT: Final = Range("integer", 0, MAX_WEIGHT)
# Priority groups: a hundred levels is far more than any failover chain (Envoy's are
# usually 2 or 3).
MAX_PRIORITY: Final = 100
# More worker processes than this is a typo, not a machine.
MAX_WORKERS: Final = 1024
# The largest replica count: a dev machine's worth of processes, not a fork bomb.
MAX_REPLICAS: Final = 64
# Protocol checks: the ceiling of the bytes one check may read.
MAX_EXPECT_BYTES: Final = 1 << 20
# Injected delays: longer than any test would wait, so a typo like "200s" for "200ms" is caught.
MAX_FAULT_DELAY: Final = 60.0
FAULT_DELAY: Final = Range("duration", 0.0, MAX_FAULT_DELAY)
# A bandwidth limit (proxy/rates.py): 0 is none; 1 TiB/s is none in practice, small enough that
# the token arithmetic stays exact.
BANDWIDTH: Final = Range("bandwidth", 0, MAX_SIZE)

RANGES: Final[Mapping[str, Mapping[str, Range]]] = {
    "settings": {
        "drain_timeout": WAIT,
        # Only has to outlast the time an orchestrator takes to stop sending new connections
        # (seconds), well inside a grace period: longer is a typo.
        "shutdown_delay": Range("duration", 0.0, 600.0),
        "max_connections": CONNECTIONS,
        "workers": Range("integer", 1, MAX_WORKERS),
    },
    "listeners.*": {
        "max_connections": CONNECTIONS,
        "backlog": Range("integer", 0, 65535),  # the kernel caps it at somaxconn anyway
        "proxy_timeout": TIMEOUT,
        "peek_timeout": TIMEOUT,
        "max_connections_per_client": CONNECTIONS,
        "rate_per_client": Range("rate", 1, 1_000_000),  # a burst of a million
        "upload_rate": BANDWIDTH,
        "download_rate": BANDWIDTH,
    },
    "pools.*": {
        "connect_timeout": TIMEOUT,
        "idle_timeout": TIMEOUT,
        "half_close_timeout": TIMEOUT,
        "retries": Range("integer", 0, 100),
        "failover_timeout": WAIT,
        "eject_after": Range("integer", 0, 1_000_000),
        "eject_for": TIMEOUT,
        "queue_timeout": WAIT,
        "max_queued": Range("integer", 1, 1_000_000),
        # 0: unbounded; else at least 1.0 (a server may carry factor × the average), and 100 is no bound
        # in practice (strategies/bounded.py refuses 0 < factor < 1).
        "balance_factor": Range("fraction", 0, 100),
        "mirror_percent": Range("fraction", 0, 100),  # of connections mirrored
        "upload_rate": BANDWIDTH,
        "download_rate": BANDWIDTH,
        "upload_rate_per_client": BANDWIDTH,
        "download_rate_per_client": BANDWIDTH,
    },
    "pools.*.servers[]": {
        "weight": WEIGHT,
        "max_connections": CONNECTIONS,
        "priority": Range("integer", 0, MAX_PRIORITY),
        "refresh": TIMEOUT,  # dns and srv entries
    },
    "pools.*.health": {
        "expect_status": Range("integer", 100, 599),
        "interval": TIMEOUT,
        "timeout": TIMEOUT,
        "rise": Range("integer", 1, 1000),
        "fall": Range("integer", 1, 1000),
        "slow_start": WAIT,
        "expect_bytes": Range("integer", 1, MAX_EXPECT_BYTES),
    },
    "pools.*.health.agent": {
        "port": Range("integer", 1, 65535),
        "interval": Range("duration", 0.1, 3600.0),  # rounds a loop apart, not a flood; at most an hour
        "timeout": Range("duration", 0.01, 60.0),  # one round: a distant agent, short of hung
    },
    "pools.*.spawn": {
        "replicas": Range("integer", 1, MAX_REPLICAS),
        "start_timeout": TIMEOUT,
        "stop_grace": WAIT,
    },
    "cluster": {
        # The membership lease: at least 2 s (one renewal at a third of it must fit a slow etcd),
        # at most an hour (a dead instance listed longer than that misleads).
        "ttl": Range("integer", 2, 3600),
        # One etcd request: a millisecond to a minute (etcd answers in milliseconds; each endpoint
        # tried costs up to this, and a command waits behind it).
        "timeout": Range("duration", 0.001, 60.0),
    },
    "faults": {  # a pool's, a server's, or the admin's PUT body
        "probability": Range("fraction", 0, 1),
        "latency": FAULT_DELAY,
        "jitter": FAULT_DELAY,
        "slice_delay": FAULT_DELAY,
        "bandwidth": Range("bandwidth", 0, MAX_SIZE),
        "reset_after": Range("size", 0, MAX_SIZE),
        "close_after": Range("size", 0, MAX_SIZE),
        "slice": Range("size", 0, MAX_SIZE),
    },
}


def range_of(table: str, key: str) -> Range:
    """The range of `key` in a table of kind `table`; KeyError for a number nobody gave a range."""
    return RANGES[table][key]
