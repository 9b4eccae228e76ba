"""Make a broker built before the fork safe to use in each worker process.

The command imports the broker in the main process (so a bad path fails
before any worker starts, and forked workers share the imported code); each
forked worker inherits that broker object as it was.

Upstream issue worked around here: nats-py's `Client` draws the random
prefix of its reply inboxes (a `NUID`) when it is constructed, and
taskiq-nats constructs its clients in the broker's and result backend's
`__init__`. Every forked worker then had the same inboxes, so a message one
process fetched from a JetStream pull consumer reached all of them: each
task ran once per worker process. After the fork, each NATS client found on
the broker or its result backend gets a NUID of its own, before it connects.
"""

from __future__ import annotations

import sys
from typing import Any

from taskiq import AsyncBroker


def renew_after_fork(broker: AsyncBroker) -> None:
    """Give the broker's NATS clients fresh randomness; nothing else changes."""
    if "nats.nuid" not in sys.modules:
        return  # no NATS client was ever built in this process
    from nats.nuid import NUID

    for owner in (broker, broker.result_backend):
        for value in list(vars(owner).values()):
            if _is_nats_client(value):
                value._nuid = NUID()


def _is_nats_client(value: Any) -> bool:
    return type(value).__module__.startswith("nats.") and hasattr(value, "_nuid")
