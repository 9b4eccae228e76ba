"""The main process's stop signals before the process manager takes them.

Light on purpose: the `worker` command enters `stops_while_starting` before it
imports FastAPI, taskiq and the project, which takes the main process most of
a second before any of the user's code runs; only the standard library is
imported here.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STARTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop(_signum: int, _frame: Any) -> None:
    """A process already stopping ignores further stop signals.

    A no-op handler rather than SIG_IGN: with SIG_IGN, a signal already
    pending as the handler changes makes Python print "ignored due to race
    condition".
    """


def ignore_further_stops() -> None:
    """The process is exiting: later stop signals must not cut its unwinding."""
    for signum in STARTING_SIGNALS:
        signal.signal(signum, ignore_stop)


class StoppedWhileStarting(KeyboardInterrupt):
    """A stop signal reached the main process before any worker started."""


@contextmanager
def stops_while_starting() -> Iterator[None]:
    """Until the process manager takes them over, a stop signal ends the command.

    The main process imports the project before any worker starts, which can
    take seconds. Python's own handling there made a Ctrl-C exit 1 (Click's
    "Aborted!") and a SIGTERM kill the command, where nothing had started
    and the exit status must say a clean stop: the caller exits 0 on
    `StoppedWhileStarting`. Installed whatever the signals' disposition was,
    as the manager's handlers are: a command started in the background
    (SIGINT ignored) stops the same way. The previous handlers come back
    only if neither the manager took over (its own outlive the command) nor
    a stop came (then the signals stay ignored while the command exits).
    """

    def stop(_signum: int, _frame: Any) -> None:
        ignore_further_stops()  # a second must not cut the unwinding
        raise StoppedWhileStarting

    previous = {signum: signal.signal(signum, stop) for signum in STARTING_SIGNALS}
    try:
        yield
    except StoppedWhileStarting:
        # Exiting, as the supervisor does at its end: Python puts the default
        # handlers back in place of its own as it finalizes, so a second
        # Ctrl-C or SIGTERM in the fraction of a second the exit takes killed
        # the command (-2, -15) instead of 0. SIG_IGN outlives that.
        for signum in STARTING_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        raise
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is stop:
                signal.signal(signum, handler)
