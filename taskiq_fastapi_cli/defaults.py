"""Defaults of our worker options, shared by the command and the runtime.

Standard library only, like exceptions.py: the command's `--help` imports it,
and so does the runtime's `FastAPIWorkerArgs`, which the command layer sits
on top of.
"""

# Covers a broker that starts after its workers (docker-compose) and restarts.
DEFAULT_BROKER_RETRY_TIMEOUT = 120.0
# Longer than any await-based task holds the loop; a blocked loop exceeds it.
DEFAULT_STALL_TIMEOUT = 60.0
