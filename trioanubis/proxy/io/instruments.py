"""Trio's instrument checks without a Python call each.

Theory of operation: Trio's run loop skips the instruments nobody installed
by asking, at every task step (twice), every reschedule and every turn of
the loop (twice), whether a hook has any: `"before_task_step" in
runner.instruments`. `runner.instruments` is Trio's `Instruments`, a
`collections.UserDict`, so each of those questions is a Python call
(`UserDict.__contains__`): about twenty a connection when connections come
one at a time, a twentieth of an empty turn of the loop.

`quicken_instruments()`, called once in the running loop, puts in its place
a `DictInstruments` holding the same hooks and instruments: a `dict`, whose
`in` is C, that is also an `Instruments`, whose `add_instrument`,
`remove_instrument` and `call` are Trio's own, working on the object itself
as their `data`. `trio.lowlevel.add_instrument` and `remove_instrument`
reach it as before, and an instrument sees every hook it did.

The run loop's `instruments` attribute is private to Trio, so the swap is
made only with a Trio no newer than `PARKED_TRIO` (the newest it was checked
against) whose `Instruments` is still the `UserDict` it replaces (from Trio
0.30; before, it was a dict itself); otherwise Trio's object stays.
"""

from __future__ import annotations

from collections import UserDict
from typing import Any, final

from trioanubis.proxy.io.woken import trio_checked

try:
    from trio._core._instrumentation import Instruments
    from trio._core._run import GLOBAL_RUN_CONTEXT
except ImportError:  # Trio moved them: nothing to quicken
    Instruments = None  # type: ignore[assignment,misc]

# The class is made only over the UserDict it replaces: Trio 0.25-0.29's `Instruments` is a dict
# itself (its `in` is C already, and `dict, Instruments` has no method order), and a layout that does
# not combine with dict leaves Trio's in place. Either way the import never fails.
DictInstruments: Any = None
if Instruments is not None and issubclass(Instruments, UserDict) and not issubclass(Instruments, dict):
    try:

        @final
        class _DictInstruments(dict[str, dict[Any, None]], Instruments):  # type: ignore[misc]
            """Trio's `Instruments` whose `in`, `[]` and `get` are the dict's own (C). What differs from
            a UserDict (`copy`, `|`, `fromkeys`: the mypy ignore above) Trio never uses."""

            @property
            def data(self) -> dict[str, dict[Any, None]]:  # type: ignore[override]  # Trio never sets it
                # What Trio's methods work on: this dict.
                return self

    except TypeError:
        pass
    else:
        DictInstruments = _DictInstruments


def quicken_instruments() -> bool:
    """Replace the running loop's `Instruments` by a `DictInstruments` holding the same; True if done
    (or already done). Call it inside `trio.run`."""
    if DictInstruments is None or not trio_checked():
        return False
    try:
        runner = GLOBAL_RUN_CONTEXT.runner
    except AttributeError:  # outside Trio's run
        return False
    current = getattr(runner, "instruments", None)
    if type(current) is DictInstruments:
        return True
    if type(current) is not Instruments:  # a table of another kind: Trio's own, or someone else's
        return False
    quick = DictInstruments(current.data)
    runner.instruments = quick
    return True
