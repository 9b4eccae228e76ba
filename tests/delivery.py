"""Delivery scenarios each broker family runs the same way (Redis, NATS).

test_reliability.py and test_nats.py call these with their broker's run and
the figures that suit it; what the user would see is asserted here, once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from workers import APP, BROKER, WorkerRun


async def each_task_runs_once_across_two_commands(run: WorkerRun, tasks: int) -> None:
    """Two commands of two processes each share `tasks` tasks, each run once."""
    first = run.start("worker", *BROKER, *APP, "--workers", "2")
    second = run.start("worker", *BROKER, *APP, "--workers", "2")
    run.wait_for("startup", processes=4)
    await run.sender.startup()
    try:
        kicked = await run.kiq_all("mark", [(n,) for n in range(tasks)])
        results = await asyncio.gather(*(t.wait_result(timeout=120) for t in kicked))
    finally:
        await run.sender.shutdown()
    assert [r.return_value for r in results] == list(range(tasks))
    assert run.stop(first) == 0
    assert run.stop(second) == 0
    ran = Counter(event for _, event in run.events() if event.startswith("ran "))
    assert ran == Counter({f"ran {n}": 1 for n in range(tasks)})
    startups, shutdowns = run.count("startup"), run.count("shutdown")
    assert len(startups) == 4
    assert startups == shutdowns == Counter(dict.fromkeys(startups, 1))
    # Both commands shared the work.
    workers_that_ran = {pid for pid, event in run.events() if event.startswith("ran ")}
    assert len(workers_that_ran) >= 2


async def killed_mid_task_is_redelivered_to_a_fresh_process(
    run: WorkerRun,
    reclaim: Callable[[], Awaitable[None]] | None = None,
    kill: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """kill -9 during a task; `reclaim` is what makes the broker hand it out
    again, once the replacement process has started; `kill` kills the
    process at a moment the broker allows (SIGKILL at once without it).

    The task takes an hour the first time, so the kill always comes first,
    however slow the machine; run again, it takes no time, well within the
    time a broker gives a delivered message before it delivers it again
    (JetStream's ack wait here): a timed task could not be both.
    """
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1", "--ack-type", "when_executed"
    )
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        task = await run.kiq("slow_first_time", 7)
        run.wait_for("task 7 started", processes=1)
        (victim,) = run.count("startup")
        if kill is None:
            os.kill(victim, signal.SIGKILL)
        else:
            await kill(victim)
        run.wait_for("startup", processes=2)  # the replacement, with its lifespan
        if reclaim is not None:
            await reclaim()
        result = await task.wait_result(timeout=60)
    finally:
        await run.sender.shutdown()
    assert result.return_value == 7
    replacement = next(pid for pid in run.count("startup") if pid != victim)
    assert (replacement, "task 7 done") in run.events()
    assert (victim, "task 7 done") not in run.events()
    assert (victim, "shutdown") not in run.events()  # killed: no shutdown code ran
    assert run.stop(worker) == 0
    assert run.count("shutdown") == Counter({replacement: 1})


def unreachable_broker_is_exit_3(
    run: WorkerRun, retry_timeout: int, cause: str, within: float
) -> None:
    """A broker nothing listens for: one line naming it and `cause`, exit 3."""
    started = time.monotonic()
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "2",
        "--broker-retry-timeout", str(retry_timeout),
    )  # fmt: skip
    try:
        code = run.exit_status(worker, timeout=60)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    errors = [ln for ln in output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, output
    # The real duration: the deadline, give or take the last attempt.
    gave_up = re.match(
        r"Error: Broker 'workerapp\.broker:broker' unreachable for (\d+\.\d) s "
        rf"\(--broker-retry-timeout {retry_timeout}\): {re.escape(cause)}",
        errors[0],
    )
    assert gave_up is not None, output
    assert retry_timeout <= float(gave_up[1]) < retry_timeout + 2, output
    assert "Traceback" not in output
    assert time.monotonic() - started < within
