"""The API process side: start the broker with the app, in one line."""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI
from taskiq import AsyncBroker, InMemoryBroker

from taskiq_fastapi._brokers import guard_connections, stop_master_lookups
from taskiq_fastapi._taskiq import require_broker, shutdown_handlers_noted
from taskiq_fastapi.connections import describe, is_connection_error
from taskiq_fastapi.integration import populate_dependency_context

logger = logging.getLogger("taskiq_fastapi")

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any] | None]]
# How long a kick or a result read waits for a broker that restarts.
BROKER_RETRY_TIMEOUT = 5.0
_guarded: weakref.WeakSet[AsyncBroker] = weakref.WeakSet()


def broker_lifespan(
    broker: AsyncBroker,
    lifespan: Lifespan | None = None,
    *,
    broker_retry_timeout: float = BROKER_RETRY_TIMEOUT,
) -> Lifespan:
    """Wrap the app's lifespan so the broker starts after it and stops before it.

    `FastAPI(lifespan=broker_lifespan(broker, lifespan))` replaces the
    `on_event` recipe. Tasks executed in this process (InMemoryBroker, tests)
    receive a Request carrying the app's live lifespan state. In a worker,
    where the integration runs this same lifespan, it only runs `lifespan`.

    The broker's kicks and result reads ride out a server restart: where
    nothing was sent yet (no connection, or a pooled one the server closed),
    they are retried for up to `broker_retry_timeout` seconds, then fail with
    `BrokerUnreachableError`. A failure after sending is raised as before, so
    nothing is sent twice.
    """
    # Checked here: wrong values otherwise fail only when the app starts.
    require_broker("broker_lifespan:", broker)
    if lifespan is not None and not callable(lifespan):
        raise TypeError(
            "broker_lifespan: lifespan must be the app's lifespan function or "
            f"None, not {lifespan!r}.",
        )

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[Mapping[str, Any] | None]:
        inner = lifespan(app) if lifespan is not None else nullcontext()
        async with inner as state:
            if broker.is_worker_process:
                yield state
                return
            populate_dependency_context(broker, app, state)
            if broker not in _guarded:
                guard_connections(broker, broker_retry_timeout)
                _guarded.add(broker)
            await broker.startup()
            try:
                yield state
            finally:
                if isinstance(broker, InMemoryBroker):
                    await broker.wait_all()  # let in-process tasks finish first
                await stop_master_lookups(broker)
                await _shutdown(broker)

    return run


async def _shutdown(broker: AsyncBroker) -> None:
    """Stop the broker; one that cannot reach its server is logged, not raised.

    Raised here, the error was thrown into the app's lifespan at its yield,
    and the app's own shutdown after it never ran: a NATS server down when
    the API stopped, with a publish nats-py still held, made its close
    raise ConnectionResetError. The broker's shutdown handlers and result
    backend are then stopped as taskiq does, on the same terms.
    """
    with shutdown_handlers_noted(broker) as begun:
        try:
            await broker.shutdown()
            return
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            failed = exc
    if begun:
        # Not run again: a handler that could not reach a server of its own
        # ran twice, with every handler before it.
        logger.warning(
            "Broker %s did not shut down cleanly: a shutdown handler, a "
            "middleware or its result backend could not reach a server (%s).",
            type(broker).__name__,
            describe(failed),
        )
        return
    logger.warning(
        "Broker %s did not shut down cleanly, its server is unreachable (%s).",
        type(broker).__name__,
        describe(failed),
    )
    try:
        await AsyncBroker.shutdown(broker)
    except Exception as rest:
        if not is_connection_error(rest):
            raise
        logger.debug("Nor did its result backend (%s).", describe(rest))
