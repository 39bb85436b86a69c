"""/metrics' build info and process metrics (metrics.py, process.py), read with prometheus-client's parser."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import IO_BACKEND, config_for, echo_handler, free_port, running_balancer, start_backend
from tests.helpers import admin, all_serving, http, supervisor, write_config
from trioanubis import __version__, compiled
from trioanubis.ops.process import process_stats

PROCESS_FAMILIES = {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                    "process_start_time_seconds", "process_open_fds", "process_max_fds"}  # fmt: skip


def families_of(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def metrics_of_a_balancer(nursery: trio.Nursery) -> dict[str, Any]:
    backend = await start_backend(nursery, echo_handler)
    data = config_for([backend.address])
    data["admin"] = {"bind": "127.0.0.1:0"}
    async with running_balancer(data) as (b, _):
        status, _, body = await http(b.admin_address, "GET", "/metrics")  # type: ignore[arg-type]
    assert status == 200
    return families_of(body.decode())


async def test_build_info_names_the_version_python_and_io_backend(nursery: trio.Nursery) -> None:
    families = await metrics_of_a_balancer(nursery)
    [build] = families["anubis_build_info"].samples
    assert build.labels == {"version": __version__, "python": platform.python_version(), "io": IO_BACKEND,
                            "build": "compiled" if compiled() else "pure"}
    assert build.value == 1 and families["anubis_build_info"].type == "gauge"


@pytest.mark.slow
async def test_the_standard_process_metrics_are_what_prometheus_client_reads(nursery: trio.Nursery) -> None:
    """Names, types and values as the official client's ProcessCollector gives them for this process."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    families = await metrics_of_a_balancer(nursery)
    ours = {name: (f.type, f.samples) for name, f in families.items() if name.startswith("process_")}
    if not Path("/proc/self/stat").exists():  # no /proc: what the platform gives, nothing made up
        assert {"process_cpu_seconds", "process_start_time_seconds"} <= set(ours)
        return
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    theirs = {f.name: (f.type, f.samples[0].value) for f in registry.collect()}
    assert set(ours) == set(theirs) == PROCESS_FAMILIES
    for name, (kind, samples) in ours.items():
        [sample] = samples
        assert kind == theirs[name][0] and sample.labels == {} and sample.value > 0, name
    value = {name: samples[0].value for name, (_, samples) in ours.items()}
    assert value["process_start_time_seconds"] == pytest.approx(theirs["process_start_time_seconds"][1])
    assert value["process_start_time_seconds"] <= time.time()
    assert value["process_max_fds"] == theirs["process_max_fds"][1]
    assert value["process_cpu_seconds"] <= theirs["process_cpu_seconds"][1]  # read a moment before


def test_without_proc_the_process_metrics_leave_out_what_they_cannot_read() -> None:
    real_open = open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    with patch("builtins.open", no_proc):
        found = process_stats()
    assert "process_resident_memory_bytes" not in found and "process_virtual_memory_bytes" not in found
    assert found["process_cpu_seconds_total"] >= 0 and found["process_start_time_seconds"] <= time.time()


@pytest.mark.slow
async def test_with_workers_each_process_reports_its_own_process_metrics(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The supervisor's merge adds counters up; process metrics are per process, labelled, never summed."""
    backend = await start_backend(nursery, echo_handler)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "anubis.toml"
    write_config(config, port, admin_port, [backend.address], access_log=False)
    async with supervisor(config):
        await all_serving(admin_port, 2)
        status, body = await admin(admin_port, "/metrics")
    assert status == 200
    families = families_of(body.decode())
    processes = {"supervisor", "1", "2"}
    for name in PROCESS_FAMILIES & set(families) or {"process_cpu_seconds"}:
        samples = families[name].samples
        assert sorted(s.labels["worker"] for s in samples) == sorted(processes), (name, samples)
    if "process_start_time_seconds" in families:
        starts = {s.labels["worker"]: s.value for s in families["process_start_time_seconds"].samples}
        assert starts["supervisor"] <= min(starts["1"], starts["2"])  # it started them (in one 10 ms
        # tick, two workers may show the same start: /proc counts in clock ticks)
    if "process_max_fds" in families:  # a sum would be 3 × the limit
        limits = {s.value for s in families["process_max_fds"].samples}
        assert limits == {process_stats()["process_max_fds"]}
    [build] = families["anubis_build_info"].samples  # one, not one per process
    assert build.value == 1 and build.labels["version"] == __version__
