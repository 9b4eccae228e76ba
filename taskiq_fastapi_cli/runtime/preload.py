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
or `gc.set_threshold` as it is imported keeps its choice, in the main
process and in every worker, as under `taskiq worker`.

Standard library only: entered before anything else is imported.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# The thresholds before the pause; None when not paused.
_before: tuple[int, int, int] | None = None


@contextmanager
def collection_paused() -> Iterator[None]:
    """No automatic collection until `ready_to_fork`, or the end of the block."""
    global _before
    _before = gc.get_threshold()
    gc.set_threshold(0, *_before[1:])
    try:
        yield
    finally:
        _resume()


def ready_to_fork() -> None:
    """Called as the workers are about to fork: what is alive is frozen."""
    if _before is not None:
        gc.freeze()
        _resume()


def _resume() -> None:
    global _before
    if _before is not None and gc.get_threshold()[0] == 0:  # not set since
        gc.set_threshold(*_before)
    _before = None
