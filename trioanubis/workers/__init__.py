"""`workers = N`: a supervisor process and N worker processes sharing the listeners.

    supervisor.py   the starting process: binds, checks health once, admin, signals, restarts
    slot.py         one worker slot: spawn, talk, wait for the exit, restart with backoff
    worker.py       one worker: today's Balancer, fed state and commands over its channel
    channel.py      the control channel: a sans-IO JSON-lines codec and its stream shell
    merge.py        pure: the health snapshot pushed to workers, sums of their counters
    sockets.py      how the listeners are shared (SO_REUSEPORT or inherited descriptors)

With `workers = 1` (the default) none of this is imported: the process is the
balancer itself, exactly as without the feature.
"""
