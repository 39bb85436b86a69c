"""A parked task's await (woken.py's `parking`): each form answers as `wait_task_rescheduled` does.

The Python form (Trio's function itself) always; the C helper's (`_park.c`)
where it was built, which the compiled run must have. Each is woken with the
shared wake-up, a value, an error and a cancellation, shared by many tasks
parked at once, and driven by the interpreter under a trace function (which
calls its `send` method instead of its C slot).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import pytest
import trio

from tests.conftest import COMPILED_RUN
from trioanubis.proxy.io import woken
from trioanubis.proxy.io.woken import WOKEN

FORMS: list[Any] = [pytest.param(woken._Parking, id="trio")]
if woken.PARKED_IN_C:
    FORMS.append(pytest.param(woken.parking, id="c-helper"))

Parking = Callable[[woken.Abort], Awaitable[object]]


def _succeeded(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


def test_the_compiled_build_parks_in_c_with_a_trio_it_was_checked_against() -> None:
    """A newer Trio gets Trio's own function: its run loop may no longer take the message as the
    helper yields it. Raise PARKED_TRIO once `_park.c` is checked against the new one."""
    if not COMPILED_RUN:
        pytest.skip("only the compiled build (ANUBIS_EXPECT_COMPILED=1) must have the C helper's")
    checked = woken.trio_version(trio.__version__) <= woken.PARKED_TRIO
    assert woken.PARKED_IN_C is checked


def test_trio_versions_read() -> None:
    assert woken.trio_version("0.35.0") == (0, 35)
    assert woken.trio_version("0.36.0rc1") == (0, 36)
    assert woken.trio_version("1.0") == (1, 0)
    assert woken.trio_version("0.x") == (999, 0)  # unreadable: as if newer
    assert woken.trio_version("7") == (999, 0)


@pytest.mark.parametrize("parking", FORMS)
async def test_woken_with_the_wake_up_a_value_or_an_error(parking: Parking) -> None:
    park = parking(_succeeded)
    task = trio.lowlevel.current_task()
    sent: list[outcome.Outcome[Any]] = [
        WOKEN, outcome.Value(42), outcome.Value((1, 2)), outcome.Value(StopIteration(3)),
        outcome.Error(KeyError("x")),
    ]  # fmt: skip
    answers: list[object] = []

    async def wake_each() -> None:
        for each in sent:
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.reschedule(task, each)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_each)
        for _ in sent[:-1]:
            answers.append(await park)  # the same object, awaited again
        with pytest.raises(KeyError):
            await park
    assert answers[:3] == [None, 42, (1, 2)]
    assert isinstance(answers[3], StopIteration) and answers[3].value == 3


@pytest.mark.parametrize("traced", [False, True], ids=["plain", "traced"])
@pytest.mark.parametrize("parking", FORMS)
def test_a_stop_iteration_raised_by_the_wake_up_is_a_runtime_error(parking: Parking, traced: bool) -> None:
    """PEP 479, as when it ends Trio's coroutine: never the await's value, nor a StopIteration
    that leaks out of the awaiting frame."""

    async def main() -> None:
        park = parking(_succeeded)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wake, trio.lowlevel.current_task(), outcome.Error(StopIteration(5)))
            with pytest.raises(RuntimeError) as raised:
                await park
        assert isinstance(raised.value.__cause__, StopIteration)

    old = sys.gettrace()
    if traced:
        sys.settrace(lambda *_: None)
    try:
        trio.run(main)
    finally:
        sys.settrace(old)


@pytest.mark.parametrize("parking", FORMS)
async def test_a_cancelled_wait_calls_its_abort_and_raises_cancelled(parking: Parking) -> None:
    aborted: list[object] = []

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        aborted.append(raise_cancel)
        return trio.lowlevel.Abort.SUCCEEDED

    park = parking(abort)
    with trio.move_on_after(0.01) as scope:
        await park
    assert scope.cancelled_caught and len(aborted) == 1
    with trio.CancelScope() as scope:  # parked again after the cancellation: the same answers
        scope.cancel()
        await park
    assert scope.cancelled_caught and len(aborted) == 2


@pytest.mark.parametrize("parking", FORMS)
async def test_one_park_serves_many_tasks_parked_at_once(parking: Parking) -> None:
    park = parking(_succeeded)
    tasks: dict[int, trio.lowlevel.Task] = {}
    got: dict[int, object] = {}

    async def parked(i: int) -> None:
        tasks[i] = trio.lowlevel.current_task()
        got[i] = await park

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(parked, i)
        await trio.testing.wait_all_tasks_blocked()
        assert len(tasks) == 50
        for i in reversed(range(50)):
            trio.lowlevel.reschedule(tasks[i], outcome.Value(i * 10))
    assert got == {i: i * 10 for i in range(50)}


@pytest.mark.parametrize("parking", FORMS)
def test_driven_under_a_trace_function(parking: Parking) -> None:
    """With a trace function set, CPython resumes an awaitable through its `send` method."""

    async def main() -> list[object]:
        park = parking(_succeeded)
        task = trio.lowlevel.current_task()
        answers = []
        async with trio.open_nursery() as nursery:
            for value in (WOKEN, outcome.Value(7), outcome.Value((8, 9))):
                nursery.start_soon(_wake, task, value)
                answers.append(await park)
        return answers

    old = sys.gettrace()
    sys.settrace(lambda *_: None)
    try:
        assert trio.run(main) == [None, 7, (8, 9)]
    finally:
        sys.settrace(old)


async def _wake(task: trio.lowlevel.Task, value: object) -> None:
    await trio.testing.wait_all_tasks_blocked()
    trio.lowlevel.reschedule(task, value)  # type: ignore[arg-type]


def test_the_c_park_steps_as_an_iterator() -> None:
    if not woken.PARKED_IN_C:
        pytest.skip("the C helper (_park.c) is not built here (an editable install)")
    from trioanubis.proxy.io._park import Park

    message = object()
    park = Park(message, WOKEN)
    assert park.__await__() is park  # type: ignore[comparison-overlap]
    assert next(park) is message  # type: ignore[call-overload]
    assert park.send(None) is message
    with pytest.raises(StopIteration) as stop:
        park.send(WOKEN)
    assert stop.value.value is None
    with pytest.raises(StopIteration) as stop:
        park.send(outcome.Value((1, 2)))
    assert stop.value.value == (1, 2)
    with pytest.raises(TypeError):
        Park(message)  # type: ignore[call-arg]
