"""proxy/io/instruments.py: Trio's instrument checks as dict lookups, with every hook still delivered."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from trio._core._instrumentation import Instruments
from trio._core._run import GLOBAL_RUN_CONTEXT

from trioanubis.proxy.io import instruments
from trioanubis.proxy.io.instruments import DictInstruments, quicken_instruments

HOOKS = ("before_run", "after_run", "task_spawned", "task_scheduled", "before_task_step",
         "after_task_step", "task_exited", "before_io_wait", "after_io_wait")  # fmt: skip


class Recorder(trio.abc.Instrument):
    """Counts every hook Trio calls on it."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        if name in HOOKS:
            return lambda *args: object.__getattribute__(self, "seen").update([name])
        return object.__getattribute__(self, name)


async def _workload() -> None:
    """One task's life, a sleep through the I/O wait and a child: every hook, a fixed number of times."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    await trio.sleep(0.001)
    await trio.lowlevel.checkpoint()


def _run_recorded(quicken: bool) -> Counter[str]:
    early = Recorder()  # installed before the swap, through trio.run

    async def main() -> None:
        if quicken:
            assert quicken_instruments()
            assert type(GLOBAL_RUN_CONTEXT.runner.instruments) is DictInstruments
        await _workload()

    trio.run(main, instruments=[early])
    return early.seen


def test_an_instrument_installed_before_the_swap_sees_what_it_saw_before() -> None:
    plain, quick = _run_recorded(False), _run_recorded(True)
    assert set(quick) == set(HOOKS)
    # The I/O waits and the run's own task steps depend on timing; what a task does does not.
    for hook in ("task_spawned", "task_exited", "after_run", "before_run"):
        assert quick[hook] == plain[hook], hook
    assert quick["before_task_step"] == quick["after_task_step"] > 0


async def test_add_and_remove_after_the_swap_reach_the_quick_table() -> None:
    assert quicken_instruments()
    table = GLOBAL_RUN_CONTEXT.runner.instruments
    recorder = Recorder()
    trio.lowlevel.add_instrument(recorder)
    assert "before_task_step" in table and recorder in table["_all"]
    await _workload()
    seen = dict(recorder.seen)
    assert seen["task_spawned"] == seen["task_exited"] == 1
    assert seen["before_task_step"] == seen["after_task_step"] > 0
    trio.lowlevel.remove_instrument(recorder)
    assert "before_task_step" not in table and dict(table) == {"_all": {}}
    await _workload()
    assert dict(recorder.seen) == seen  # removed: nothing more
    with pytest.raises(KeyError):
        trio.lowlevel.remove_instrument(recorder)


async def test_a_failing_instrument_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            raise RuntimeError("instrument failed")

    assert quicken_instruments()
    table = GLOBAL_RUN_CONTEXT.runner.instruments
    with caplog.at_level(logging.ERROR, logger="trio.abc.Instrument"):
        trio.lowlevel.add_instrument(Failing())
        await trio.lowlevel.checkpoint()
    assert "before_task_step" not in table
    assert dict(table) == {"_all": {}}
    assert "instrument failed" in caplog.text


async def test_once_per_run() -> None:
    assert quicken_instruments()
    table = GLOBAL_RUN_CONTEXT.runner.instruments
    assert quicken_instruments()
    assert GLOBAL_RUN_CONTEXT.runner.instruments is table
    assert isinstance(table, Instruments)


async def test_a_newer_trio_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio, "__version__", "0.99.0")
    before = GLOBAL_RUN_CONTEXT.runner.instruments
    assert not quicken_instruments()
    assert GLOBAL_RUN_CONTEXT.runner.instruments is before
    assert type(before) is Instruments


async def test_an_unknown_table_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(Instruments):
        __slots__ = ()

    runner = GLOBAL_RUN_CONTEXT.runner
    other = Other([])
    monkeypatch.setattr(runner, "instruments", other)
    assert not quicken_instruments()
    assert runner.instruments is other


def test_outside_trio_nothing_happens() -> None:
    assert not quicken_instruments()


def test_without_trios_class_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instruments, "DictInstruments", None)

    async def main() -> bool:
        return quicken_instruments()

    assert trio.run(main) is False


async def test_the_serving_process_settles_with_the_quick_table() -> None:
    """`anubis run` and each worker call `app.settle()` once they serve."""
    from trioanubis.app import settle

    threshold = gc.get_threshold()
    try:
        settle()
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert type(GLOBAL_RUN_CONTEXT.runner.instruments) is DictInstruments


def test_the_checks_are_the_dicts_own() -> None:
    """What the swap is for: `in` and `[]` without a Python call."""
    assert DictInstruments.__contains__ is dict.__contains__
    assert DictInstruments.__getitem__ is dict.__getitem__


async def test_an_instrument_given_to_trio_run_can_be_removed_after_the_swap() -> None:
    early = Recorder()

    async def main() -> dict[str, int]:
        assert quicken_instruments()
        trio.lowlevel.remove_instrument(early)  # a KeyError if the swap lost Trio's registry
        seen = dict(early.seen)
        await _workload()
        assert dict(early.seen) == seen
        trio.lowlevel.add_instrument(early)
        trio.lowlevel.add_instrument(early)  # twice: once, as Trio does
        await trio.lowlevel.checkpoint()
        table = GLOBAL_RUN_CONTEXT.runner.instruments
        return {hook: len(table[hook]) for hook in table}

    counts = await trio.to_thread.run_sync(lambda: trio.run(main, instruments=[early]))
    assert counts == {hook: 1 for hook in ("_all", *HOOKS)}


OLD_TRIO = """
import trio._core._instrumentation as place

class Instruments(dict):  # Trio 0.25-0.29's
    __slots__ = ()

place.Instruments = Instruments
import trio
from trioanubis.proxy.io import instruments

async def main():
    return instruments.quicken_instruments()

print(instruments.DictInstruments, trio.run(main))
"""


def test_a_trio_whose_table_is_a_dict_imports_and_keeps_its_own() -> None:
    done = subprocess.run([sys.executable, "-c", OLD_TRIO], capture_output=True, text=True, timeout=60,
                          cwd=Path(instruments.__file__).parents[3])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "False"]
