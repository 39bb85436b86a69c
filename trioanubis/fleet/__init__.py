"""A fleet of balancers sharing one etcd: servers, the operator's commands, membership.

Theory of operation: the etcd client (trioanubis/cluster/) carries the
bytes; this package decides what they mean. Its modules, lowest first:

- `keys.py`: sans-IO. The key layout under `[cluster] prefix` and the values
  stored there, decoded as untrusted input (anything may write them):

      {prefix}pools/{pool}/servers/{name}   a server entry as JSON (servers_from = "etcd")
      {prefix}state/{pool}/{server}/{aspect} the last command of one aspect (drain, weight,
                                             faults, member), as control.py encodes it
      {prefix}members/{instance}            an instance's membership, under its lease

- `members.py`: sans-IO. An instance's membership record (name, version,
  what it sees of each server) and where the instances' views disagree.
- `servers.py`: a pool's servers from etcd keys, changed through Pool methods.
- `fleet.py`: `Fleet`, the task in the nursery tree: it reads the prefix,
  watches it from the next revision, applies what changes, writes the
  commands this instance's operator made (queued while etcd is down), and
  keeps the membership alive. etcd is never in the data path.
"""
