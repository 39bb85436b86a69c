"""`anubis fleet`: the fleet's instances and disagreements, read from etcd itself.

Theory of operation: the command reads `{prefix}members/` with the config's
[cluster] (no running instance is needed, so it works in an incident where
the local one is down) and prints what `GET /fleet` answers: as JSON with
`--json`, else one line per instance and one per disagreement, the
disagreements last since they are what to look at. A value that does not
decode is reported on stderr and left out, as the instances do.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import trio

from trioanubis.cluster import EtcdClient
from trioanubis.config import ClusterConfig, Config
from trioanubis.errors import ConfigError
from trioanubis.fleet.keys import BadValue, MemberKey, parse_key
from trioanubis.fleet.members import Member, decode_member, fleet_document


async def read_members(cluster: ClusterConfig) -> list[Member]:
    """Every instance registered under the prefix; undecodable ones named on stderr."""
    async with EtcdClient(cluster.endpoints, ca=cluster.ca or None, cert=cluster.cert or None,
                          key=cluster.key or None, username=cluster.username or None,
                          password=cluster.password or None, timeout=cluster.timeout) as etcd:  # fmt: skip
        found = await etcd.get(f"{cluster.prefix}members/", prefix=True)
    members = []
    for kv in found.kvs:
        key = parse_key(cluster.prefix, kv.key)
        if isinstance(key, MemberKey):
            try:
                members.append(decode_member(kv.key.decode(errors="replace"), key.name, kv.value))
            except BadValue as exc:
                print(f"anubis fleet: {exc}; left out", file=sys.stderr)
    return members


def describe_fleet(document: dict[str, Any], where: str) -> str:
    """The text `anubis fleet` prints for a /fleet document."""
    instances = document["instances"]
    lines = [f"fleet {where}: {len(instances)} instance{'' if len(instances) == 1 else 's'}"]
    now = time.time()
    for m in instances:
        states = [state for servers in m["servers"].values() for state in servers.values()]
        admin = f"admin {m['admin']}" if m["admin"] else "no admin"
        lines.append(f"  {m['name']}: anubis {m['version'] or '?'}, pid {m['pid']}, {admin}, up "
                     f"{max(0.0, now - m['started']):.0f}s, servers {states.count('up')} up "
                     f"{states.count('down')} down")  # fmt: skip
    if not document["disagreements"]:
        lines.append("no disagreements: every instance sees every server the same")
    for row in document["disagreements"]:
        lines.append(f"  {row['pool']}/{row['server']}: up in {', '.join(row['up'])}; "
                     f"DOWN in {', '.join(row['down'])}")  # fmt: skip
    return "\n".join(lines)


def run_fleet(config: Config, as_json: bool) -> int:
    """`anubis fleet`: print the fleet; EtcdError (an AnubisError) when etcd does not answer."""
    cluster = config.cluster
    if cluster is None:
        raise ConfigError(f"{config.source}: no [cluster] table: this balancer is in no fleet")
    members = trio.run(read_members, cluster)
    document = fleet_document(members)
    if as_json:
        print(json.dumps(document, indent=1))
    else:
        print(describe_fleet(document, f"under {cluster.prefix} on {', '.join(cluster.endpoints)}"))
    return 0
