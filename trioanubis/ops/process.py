"""What this process uses, as Prometheus' standard `process_*` metrics.

Theory of operation: `process_stats` reads the process's own figures and
returns plain numbers; `process_lines` turns them into exposition lines,
which metrics.py appends to `/metrics`. The names, types and
units are those of the official clients (prometheus-client's
`ProcessCollector`), so existing dashboards and alerts work unchanged:

    process_cpu_seconds_total       user + system CPU time (os.times: every platform)
    process_resident_memory_bytes   resident set size          (/proc/self/stat)
    process_virtual_memory_bytes    virtual memory size        (/proc/self/stat)
    process_start_time_seconds      start, since the epoch     (/proc/self/stat + /proc/stat's
                                    btime; elsewhere when this module was imported, a fraction
                                    of a second after the start)
    process_open_fds                open descriptors           (/proc/self/fd, else /dev/fd)
    process_max_fds                 the soft RLIMIT_NOFILE     (resource: POSIX)

A platform that cannot give a figure (no /proc on macOS and the BSDs, no
`resource` on Windows) has that line left out rather than a made-up value.
Reading /proc is a few system calls on files the kernel builds in memory:
no disk, and nothing that can block the event loop for long.

With workers, every process answers for itself and labels its own lines
(`worker="0"`, ..., `worker="supervisor"`), so that the supervisor's merge
(workers/merge.py) keeps them apart instead of adding them up: a sum of start times or
of descriptor limits means nothing, while `sum(process_resident_memory_bytes)`
over the labels still gives the whole group's memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Final

# Approximates the start time where /proc cannot tell it (imported at start-up, with metrics.py).
_IMPORTED: Final = time.time()

PROCESS_METRICS: Final = (
    ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
)


def process_stats() -> dict[str, float]:
    """The figures this platform gives, by metric name (a missing one: the platform has none)."""
    times = os.times()
    found: dict[str, float] = {"process_cpu_seconds_total": times.user + times.system}
    found.update(_proc_stat())
    found.setdefault("process_start_time_seconds", _IMPORTED)
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            found["process_open_fds"] = len(os.listdir(directory))
            break
        except OSError:
            continue
    try:
        import resource
    except ImportError:  # Windows
        return found
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        found["process_max_fds"] = soft
    return found


def _proc_stat() -> dict[str, float]:
    """Memory and start time from /proc/self/stat (proc(5)); {} where there is no /proc."""
    try:
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()  # the name in (...) may hold spaces
        with open("/proc/stat", "rb") as file:
            boot = next(float(line.split()[1]) for line in file if line.startswith(b"btime "))
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, StopIteration, ValueError, AttributeError):
        return {}
    # Fields counted from 1 in proc(5); fields[0] is field 3 (state).
    return {
        "process_start_time_seconds": boot + int(fields[22 - 3]) / ticks,
        "process_virtual_memory_bytes": float(fields[23 - 3]),
        "process_resident_memory_bytes": float(int(fields[24 - 3]) * page),
    }


def process_lines(labels: str = "") -> Iterator[str]:
    """The `process_*` families; `labels` ('{worker="0"}') goes on every sample."""
    found = process_stats()
    for name, kind, help_text in PROCESS_METRICS:
        if name in found:
            yield f"# HELP {name} {help_text}"
            yield f"# TYPE {name} {kind}"
            yield f"{name}{labels} {_number(found[name])}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
