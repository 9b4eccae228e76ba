"""Subprocesses without uvloop, as if it were not installed.

taskiq's worker and uvicorn run on uvloop wherever it is importable (FastAPI's
"standard" extra installs it), on asyncio's loop otherwise. The dev tools
install uvloop; the suite runs its subprocesses on one loop or the other, as
TASKIQ_FASTAPI_TEST_LOOP says (tests/conftest.py), and `make bench` runs its
commands on asyncio's loop, as it always measured them.
"""

from __future__ import annotations

import os
from pathlib import Path


def hide_uvloop() -> None:
    """Processes started from now on cannot import uvloop; this one still can.

    This directory goes first on their PYTHONPATH: its `uvloop` module raises
    ImportError, which taskiq and uvicorn take as uvloop not installed.
    """
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [here, os.environ.get("PYTHONPATH")])
    )
