"""Micro-benchmark: the CPU one of Trio's wake-ups costs, a `reschedule` and the task step it causes.

    python bench/wakeup_cost.py [--wakeups 400000] [--tasks 64] [--outcome woken|value]

A connection costs two of them (its crew hands it to an idle task; its
relay's end wakes the task to close it: proxy/connection.py), so this is the
floor of the user time any connection costs here, whatever the rest does.
`--tasks` tasks park in `wait_task_rescheduled` as an idle connection task
does; one task wakes every parked one, lets them run (a checkpoint), and
again, until `--wakeups` wake-ups; it prints the user and system CPU per
wake-up. The tasks' stacks are one frame deep: a real connection task's are
deeper, so its wake-ups cost more. `--outcome` is what each is woken with: the
product's reusable `WOKEN` (proxy/io/woken.py, the default) or what Trio makes
when given none, a new `outcome.Value(None)`. Not a test: figures depend on the
machine.
"""

from __future__ import annotations

import argparse
import resource

import outcome
import trio
import trio.testing

from trioanubis.proxy.io.woken import WOKEN


async def measure(wakeups: int, tasks: int, value: outcome.Outcome[object] | None) -> tuple[float, float]:
    parked: list[trio.lowlevel.Task] = []

    def leave(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.SUCCEEDED

    async def sleeper() -> None:
        while True:
            parked.append(trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(leave)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(sleeper)
        await trio.testing.wait_all_tasks_blocked()
        done = 0
        before = resource.getrusage(resource.RUSAGE_SELF)
        while done < wakeups:
            batch = parked[:]
            parked.clear()
            if value is None:
                for task in batch:
                    trio.lowlevel.reschedule(task)  # Trio makes an outcome.Value(None) for each
            else:
                for task in batch:
                    trio.lowlevel.reschedule(task, value)
            done += len(batch)
            await trio.lowlevel.checkpoint()
        after = resource.getrusage(resource.RUSAGE_SELF)
        nursery.cancel_scope.cancel()
    return ((after.ru_utime - before.ru_utime) / done * 1e6, (after.ru_stime - before.ru_stime) / done * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wakeups", type=int, default=400_000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--outcome", choices=("woken", "value"), default="woken",
                        help="WOKEN (the product's, reused) or a new outcome.Value (Trio's default)")
    args = parser.parse_args()
    user, system = trio.run(measure, args.wakeups, args.tasks, WOKEN if args.outcome == "woken" else None)
    print(f"{user:.2f} µs user + {system:.2f} µs system per wake-up (reschedule + task step, "
          f"woken with {'WOKEN' if args.outcome == 'woken' else 'outcome.Value'}), Trio {trio.__version__}")


if __name__ == "__main__":
    main()
