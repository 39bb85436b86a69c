"""What a parked task is woken with, and the await that parks it, made cheaper than Trio's default.

Not compiled (setup.py): it derives from `outcome.Outcome`, a Python class,
and mypyc's build of such a class in a compiled module does not compile.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any, Final, TypeVar, final

import outcome
import trio

_T = TypeVar("_T")


@final
class Woken(outcome.Outcome[Any]):
    """What a parked task is woken with (`trio.lowlevel.reschedule`'s `next_send`): its value, as
    `outcome.Value` gives it, without that class's single-use guard.

    `outcome.Value` is an attrs-frozen object that sets a flag when it is
    unwrapped: 0.46 µs a wake-up, made and unwrapped (against 0.13 µs for this
    one made, 0.03 µs for `WOKEN` reused), and Trio makes one for every
    `reschedule(task)` passed none. Each wake-up here is unwrapped once, by the
    `wait_task_rescheduled` it ends, so nothing needs the guard. Two wake-ups
    a connection are ours: its task handed its client (`Crew.run`), and woken at
    its relay's end (the epoll backend's `wake`).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def unwrap(self) -> Any:
        return self.value

    def send(self, gen: Generator[_T, Any, object]) -> _T:
        return gen.send(self.value)

    async def asend(self, agen: AsyncGenerator[_T, Any]) -> _T:
        return await agen.asend(self.value)


# The plain wake-up ("go on"): one object for all of them.
WOKEN: Final = Woken(None)


# The abort callback of a wait (`trio.lowlevel.wait_task_rescheduled`'s).
Abort = Callable[[Any], trio.lowlevel.Abort]


@final
class _Parking:
    """`await trio.lowlevel.wait_task_rescheduled(abort)`, as one object awaited again and again."""

    __slots__ = ("abort",)

    def __init__(self, abort: Abort) -> None:
        self.abort = abort

    def __await__(self) -> Generator[Any, Any, object]:
        return trio.lowlevel.wait_task_rescheduled(self.abort).__await__()


parking: Callable[[Abort], Awaitable[object]] = _Parking
"""`parking(abort)`: an awaitable made once and awaited at each wait, each `await` being
`await trio.lowlevel.wait_task_rescheduled(abort)`.

Where the C helper is built (`_park.c`) each await is one C object's two
steps: it yields Trio's own trap message, made once (`WaitTaskRescheduled`,
private to Trio but what its run loop has matched since 0.8), and returns
what the wake-up sends, unwrapped (`WOKEN` without a call). Trio's function
runs four Python calls a task step for the same: its coroutine and
generator frames, the message made anew, and the unwrap. Without the helper,
with a Trio newer than `PARKED_TRIO` (the newest checked against it) or one
that no longer has the message class, Trio's function itself.
"""


def trio_version(version: str) -> tuple[int, int]:
    """(major, minor) of a Trio version string; (999, 0) when it does not read as one."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 999, 0


# The newest Trio whose run loop the C helper's await was checked against (its `wait_task_rescheduled`
# and the run loop's handling of its message). A newer Trio gets Trio's own function until checked.
PARKED_TRIO: Final = (0, 35)


def trio_checked() -> bool:
    """The running Trio is no newer than `PARKED_TRIO`: what uses Trio's private parts here was checked
    against it (the park, readable.py's table, instruments.py's)."""
    return trio_version(trio.__version__) <= PARKED_TRIO


if trio_checked():
    with contextlib.suppress(ImportError):
        from trio._core._traps import WaitTaskRescheduled

        from trioanubis.proxy.io._park import Park

        def _parked(abort: Abort) -> Awaitable[object]:
            return Park(WaitTaskRescheduled(abort), WOKEN)

        parking = _parked

# Which `parking` is in use: True for the C helper's.
PARKED_IN_C: Final = parking is not _Parking
