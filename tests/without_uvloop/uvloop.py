"""On PYTHONPATH, uvloop is not importable: as if it were not installed.

taskiq's worker and uvicorn run on uvloop wherever it is importable (FastAPI's
"standard" extra installs it), on asyncio's loop otherwise. The suite installs
uvloop and runs each subprocess on one loop or the other, as
TASKIQ_FASTAPI_TEST_LOOP says (conftest.py): users have both.
"""

raise ImportError("uvloop is hidden by the test suite (TASKIQ_FASTAPI_TEST_LOOP)")
