"""What a parked task is woken with, made cheaper than Trio's default.

Not compiled (setup.py): it derives from `outcome.Outcome`, a Python class,
and mypyc's build of such a class in a compiled module does not compile.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any, Final, TypeVar, final

import outcome

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
