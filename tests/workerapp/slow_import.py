"""A task module whose import takes seconds: a stop signal lands mid-import."""

import time

from workerapp.app import record

record("importing")
time.sleep(30)
