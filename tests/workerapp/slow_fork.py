"""A task module that registers a slow after-fork hook, as some client libraries
do: a forked worker spends seconds between its birth and its own code, with the
stop signals held, so that stop signals surely wait for it there."""

import os
import time

from workerapp.app import record


def _slow_child() -> None:
    record("forked")
    time.sleep(3)


os.register_at_fork(after_in_child=_slow_child)
