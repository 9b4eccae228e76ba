"""A sync task with FastAPI dependencies, for taskiq's --use-process-pool."""

import logging
import os
from typing import Annotated

from fastapi import Depends

from workerapp.broker import broker
from workerapp.dependencies import Session


def pid() -> int:
    return os.getpid()


@broker.task
def sync_receipt(
    n: int, session: Session, solved_in: Annotated[int, Depends(pid)]
) -> dict[str, object]:
    """The route's chain in a sync task: solved in the worker process, run in
    a process of taskiq's pool."""
    return {"n": n, "session": session, "solved_in": solved_in, "pid": os.getpid()}


@broker.task
def sync_logged(n: int) -> int:
    """Logs from the process of taskiq's pool it runs in."""
    logging.getLogger("workerapp.sync_deps").info("pool line %s", n)
    return os.getpid()
