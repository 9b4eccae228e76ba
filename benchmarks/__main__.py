"""Run every benchmark and print its ratios against the project's targets."""

from __future__ import annotations

import operator
import sys

from benchmarks import cli_startup, exit_time, inprocess, kick, memory, solver, worker
from tools.redis_server import redis_url
from tools.without_uvloop import hide_uvloop


def main() -> int:
    hide_uvloop()  # the commands on asyncio's loop, as every run before uvloop
    rows = inprocess.run()
    print()
    rows += solver.run()
    print()
    rows += cli_startup.run()
    print()
    with redis_url() as url:
        rows += kick.run(url)
        print()
        rows += kick.run_recording(url)
        print()
        rows += worker.run(url)
        print()
        rows += worker.recording(url)
        print()
        rows += worker.cancelling(url)
        print()
        rows += worker.metrics(url)
        print()
        rows += worker.observability(url)
        print()
        rows += memory.run(url)
        print()
        rows += memory.with_metrics(url)
        print()
        rows += exit_time.run(url)
    print()
    print(f"{'ratio':<52} {'measured':>9} {'target':>9}")
    missed = 0
    for what, ratio, op, target in rows:
        if target is None:  # shown, without a target
            print(f"{what:<52} {ratio:>8.3f}x {'shown':>9}")
            continue
        ok = {"<=": operator.le, ">=": operator.ge}[op](ratio, target)
        missed += not ok
        flag = "" if ok else "  MISSED"
        if what.endswith("(ms)"):  # a difference in milliseconds, not a ratio
            print(f"{what:<52} {ratio:>7.0f}ms {op:>3}{target:.0f}ms{flag}")
            continue
        print(f"{what:<52} {ratio:>8.3f}x {op:>3}{target:.2f}x{flag}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
