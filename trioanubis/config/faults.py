"""A `faults` table: network faults to inject on a pool's or a server's connections.

Theory of operation: `parse_fault_table` turns a table (from a file, under a
pool or a server) into a `FaultConfig`; `parse_faults` does the same for a
table from elsewhere, the admin's JSON body, with the same rules and errors
naming the key. `trioanubis.proxy.faults` applies the record.
"""

from __future__ import annotations

from trioanubis.config.model import FaultConfig
from trioanubis.config.node import Node

FAULT_KEYS = (
    "direction", "probability", "latency", "jitter", "bandwidth", "reset_after", "close_after",
    "blackhole", "refuse", "slice", "slice_delay",
)  # fmt: skip


def parse_fault_table(node: Node) -> FaultConfig:
    """A `faults` table (config, or an admin PUT body); every error names the key."""
    node.check_keys(FAULT_KEYS)
    delays = {key: node.duration(key, 0.0) for key in ("latency", "jitter", "slice_delay")}
    faults = FaultConfig(
        direction=node.choice("direction", "both", ("upstream", "downstream", "both")),  # type: ignore[arg-type]
        probability=node.fraction("probability", 1.0),
        bandwidth=node.size("bandwidth"),
        reset_after=node.size("reset_after"),
        close_after=node.size("close_after"),
        blackhole=node.boolean("blackhole", False),
        refuse=node.boolean("refuse", False),
        slice=node.size("slice"),
        **delays,
    )
    if faults.slice_delay and not faults.slice:
        raise node.error("has no effect without slice", node.data["slice_delay"], "slice_delay")
    if faults.jitter > faults.latency:
        raise node.error("must not exceed latency (a chunk is never due before it arrived)",
                         node.data["jitter"], "jitter")  # fmt: skip
    return faults


def parse_faults(data: object, source: str = "admin request") -> FaultConfig:
    """A faults table from elsewhere than a file (the admin's JSON body); ConfigError naming the key."""
    return parse_fault_table(Node(data, "faults", source, table="faults"))
