"""The main process imports the project once, for the workers it forks.

Python's own recipe for a process that imports and then forks (the docs of
`gc.freeze`) is followed: no garbage collection while the project is
imported, and every object alive then frozen before the workers fork.

- Importing FastAPI, taskiq, a broker client and an app allocates some
  135,000 objects, and the collections they set off find about 2,000 of
  them garbage, for 3.8% of the imports' instructions (valgrind): most of
  the command's time to its first task is these imports.
- Frozen objects are never scanned again: a worker's collections neither
  take the time to scan what it inherited nor write to the pages that hold
  it, pages the forked workers share with the main process (the PSS rows of
  `make bench`). The few cycles the imports left stay, as the modules do.

Paused by a first threshold of 0 (which stops automatic collection as
`gc.disable` does), not by `gc.disable`: a project that calls `gc.disable`
as it is imported keeps its choice, in the main process and in every
worker, as under `taskiq worker`. Its thresholds too: while paused,
`gc.get_threshold` and `gc.set_threshold` read and set the thresholds the
pause ends with, not the pause's own. Telling a project's threshold from the
pause's by value could not: a project's `gc.set_threshold(0)` (automatic
collection off) was undone, and so was `gc.set_threshold(young, middle,
oldest)` made from the `young` it read, the pause's 0.

A process the project forks while it is imported (a multiprocessing
Manager's server, a helper it starts at import) is no worker and may run as
long as the command: the pause ends in it as it starts, or it never
collected at all.

Standard library only: entered before anything else is imported.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

_get_threshold = gc.get_threshold
_set_threshold = gc.set_threshold

# The thresholds the pause ends with; None when not paused.
_after: tuple[int, int, int] | None = None


def _paused_get_threshold() -> tuple[int, int, int]:
    """`gc.get_threshold` while paused: the thresholds collection resumes with."""
    return _get_threshold() if _after is None else _after


def _paused_set_threshold(*thresholds: int) -> None:
    """`gc.set_threshold` while paused: the thresholds collection resumes with.

    Python itself checks the arguments and keeps the thresholds not given
    (the pause's differ only in the first); the pause's 0 then comes back.
    Kept by a project that imported the function itself, it is
    `gc.set_threshold` once the pause is over.
    """
    global _after
    _set_threshold(*thresholds)
    if _after is not None:
        _after = _get_threshold()
        _set_threshold(0, *_after[1:])


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic collection until `ready_to_fork`, or the end of the block."""
    global _after
    _after = _get_threshold()
    try:
        _set_threshold(0, *_after[1:])
        gc.get_threshold = _paused_get_threshold
        gc.set_threshold = _paused_set_threshold
        yield
    finally:
        _resume()


def ready_to_fork() -> None:
    """Called as the workers are about to fork: what is alive is frozen."""
    if _after is not None:
        gc.freeze()
        _resume()


def _resume() -> None:
    global _after
    if _after is not None:
        _set_threshold(*_after)
        gc.get_threshold = _get_threshold
        gc.set_threshold = _set_threshold
    _after = None


# A no-op once the pause is over, as the workers fork.
os.register_at_fork(after_in_child=_resume)
