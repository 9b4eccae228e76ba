"""Broker outages: a worker process waits for its broker instead of dying.

Upstream behaviours worked around here:

- taskiq's receiver lets an exception from the broker's fetch (or startup)
  end the worker process, with a traceback; its supervisor starts a new one,
  which runs the app's lifespan again, and with the broker down does so about
  once a second, for ever.
- redis-py 8 gives connections a 5 s socket timeout by default, and
  taskiq-redis's `ListQueueBroker` waits for messages with a blocking BRPOP:
  an idle worker's fetch ends with redis's TimeoutError every 5 s, which
  taskiq-redis does not catch. A fetch that times out after waiting is an
  idle wait, not an outage: it is started again at once, logged at DEBUG.
- After a restart of the server, every connection a pool kept from before
  fails once, and taskiq-redis's pools do not retry: the first results after
  an outage were lost ("Can't set result in result backend"). Saving a result
  and acknowledging a message are retried the same way as fetching.

- A server that restarted without its data (Redis without persistence, NATS
  without its store): taskiq-redis's stream broker and taskiq-nats create
  their consumer group, stream, consumer and bucket only at startup, and
  every fetch then failed. `taskiq_fastapi._brokers.LostState` recreates them
  in place, one WARNING line; pooled Redis connections the server closed are
  renewed before use (`renew_closed_connections`).

Retried: connection-type errors, as `taskiq_fastapi.connections` tells them
(the API process's `broker_lifespan` uses the same rule). Anything else keeps
taskiq's behaviour. Retries back off exponentially with jitter, one WARNING
line each, and one line when the broker is back. Past `--broker-retry-timeout`
without a successful fetch, the process asks the whole command to stop
gracefully and the command exits 3.

- Broker clients that retry connecting on their own inside the broker's
  startup: nats-py tries 60 times, 2 s apart, before it raises, so a
  `--broker-retry-timeout` shorter than that was never applied. Once the
  worker's startup handlers (the app's lifespan) are done, the rest of the
  broker's startup is bounded by the retry timeout too.
- A broker whose startup never connected may fail to shut down: taskiq-nats
  closes its client first, which raises for a client that never connected,
  and so never ran the shutdown handlers, the app's lifespan among them
  (taskiq then logged the error with a traceback). Then the handlers run
  through taskiq's base `AsyncBroker.shutdown`, and the error is logged at
  DEBUG: the process is stopping because the broker was unreachable.
- nats-py logs each failed connection attempt with a full traceback (its
  default error callback). In worker processes those records keep their
  message and cause, on one line, without the traceback.

Per message, a fetch passes through one more generator and an ackable
message gets its ack wrapped; the retries themselves only run on failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from taskiq import AckableMessage, AsyncBroker, TaskiqEvents, TaskiqState
from taskiq.utils import maybe_awaitable

from taskiq_fastapi._brokers import LostState, renew_closed_connections
from taskiq_fastapi.connections import (
    backoff,
    describe,
    is_connection_error,
    one_line,
)
from taskiq_fastapi.exceptions import TaskiqFastAPIError

logger = logging.getLogger("taskiq_fastapi")

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 30.0
# A fetch that waited this long before timing out was idle, not cut off.
IDLE_WAIT_SECONDS = 1.0
T = TypeVar("T")


class BrokerStartupError(TaskiqFastAPIError):
    """The broker could not start, or stayed unreachable for too long."""


class WorkerStopped(Exception):  # noqa: N818 - a stop, not an error
    """A signal stopped the worker while it waited for its broker."""


def _backoff(attempt: int) -> float:
    return backoff(attempt, FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS)


class BrokerOutages:
    """Installed on the broker of every worker process by the runner."""

    def __init__(
        self,
        broker: AsyncBroker,
        path: str,
        retry_timeout: float,
        give_up: Callable[[str], None],
    ) -> None:
        self.path = path
        self.retry_timeout = retry_timeout
        self.give_up = give_up
        self.outage_since: float | None = None
        self.attempts = 0
        self.stopping = asyncio.Event()
        self.connecting_since: float | None = None
        logging.getLogger("nats.aio.client").addFilter(one_line)
        self.started = False
        self.lost = LostState(broker, repr(path))
        renew_closed_connections(broker)
        self._wrap_startup(broker)
        self._wrap_shutdown(broker)
        self._wrap_listen(broker)
        self._wrap_results(broker)

    def stop(self) -> None:
        """A signal arrived: stop waiting for the broker."""
        self.stopping.set()

    def _wrap_startup(self, broker: AsyncBroker) -> None:
        startup = broker.startup
        # Registered after the app's lifespan handler: from then on, what is
        # left of the startup is the broker connecting.
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, self._connecting)

        async def startup_until_reachable() -> None:
            while True:
                try:
                    await self._bounded(startup())
                    await self.lost.remember()
                except TaskiqFastAPIError:
                    raise
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise BrokerStartupError(
                            f"Broker {self.path!r} failed to start: {describe(exc)}",
                        ) from exc
                    if await self._wait_or_give_up(exc, starting=True):
                        raise WorkerStopped from exc
                    continue
                self._recovered()
                self.started = True
                return

        broker.startup = startup_until_reachable  # type: ignore[method-assign]

    def _wrap_shutdown(self, broker: AsyncBroker) -> None:
        shutdown = broker.shutdown

        async def shutdown_even_if_never_connected() -> None:
            try:
                await shutdown()
            except Exception as exc:
                if self.started:
                    raise
                logger.debug(
                    "Broker %r, which never connected, failed to shut down (%s).",
                    self.path,
                    describe(exc),
                )
                try:
                    await AsyncBroker.shutdown(broker)  # handlers, then backend
                except Exception as backend_exc:  # a backend never started either
                    logger.debug("Its result backend too: %s", describe(backend_exc))

        broker.shutdown = shutdown_even_if_never_connected  # type: ignore[method-assign]

    def _connecting(self, _state: TaskiqState) -> None:
        self.connecting_since = time.monotonic()

    async def _bounded(self, startup: Awaitable[None]) -> None:
        """Run the broker's startup; past the retry timeout of connecting, fail.

        The app's lifespan is not bounded: only the time since it finished.
        """
        self.connecting_since = None
        running = asyncio.ensure_future(startup)
        while True:
            done, _ = await asyncio.wait({running}, timeout=0.25)
            if done:
                return running.result()
            since = self.connecting_since
            if since is not None and time.monotonic() - since > self.retry_timeout:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running
                raise ConnectionError(
                    f"its startup was still connecting after {self.retry_timeout:g} s"
                )

    def _wrap_listen(self, broker: AsyncBroker) -> None:
        listen: Callable[[], AsyncIterator[Any]] = broker.listen

        async def listen_until_reachable() -> AsyncGenerator[Any, None]:
            source: AsyncIterator[Any] | None = None
            started = time.monotonic()
            try:
                while True:
                    if source is None:
                        source, started = listen(), time.monotonic()
                    try:
                        message = await anext(source)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        source = None  # it raised, so it is finished
                        if not is_connection_error(exc):
                            outage = await self._recover(exc)
                            if outage is None:
                                continue  # recreated: fetch again
                            exc = outage
                        if await self._retry_fetch(exc, time.monotonic() - started):
                            return  # stopping: taskiq finishes in-flight tasks
                        continue
                    self._recovered()
                    if isinstance(message, AckableMessage):
                        message = self._retrying_ack(message)
                    yield message
                    started = time.monotonic()
            finally:
                if source is not None:
                    await source.aclose()  # type: ignore[attr-defined]

        broker.listen = listen_until_reachable  # type: ignore[method-assign]

    def _wrap_results(self, broker: AsyncBroker) -> None:
        backend = broker.result_backend
        set_result = backend.set_result

        async def set_result_until_saved(task_id: str, result: Any) -> None:
            await self._until_done(lambda: set_result(task_id, result), "Result")

        backend.set_result = set_result_until_saved  # type: ignore[method-assign]

    def _retrying_ack(self, message: AckableMessage) -> AckableMessage:
        ack = message.ack

        async def ack_until_done() -> None:
            # taskiq allows a synchronous ack: Callable[[], Awaitable | None].
            await self._until_done(lambda: maybe_awaitable(ack()), "Acknowledgement")

        # A copy, so a broker's own subclass keeps its type and fields.
        return message.model_copy(update={"ack": ack_until_done})

    async def _until_done(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Retry `call` while the broker is unreachable and the worker runs.

        The fetch loop decides when to give up; once the worker stops, the
        last error is raised and taskiq reports it as it did before.
        """
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_connection_error(exc):
                    outage = await self._recover(exc)
                    if outage is None:
                        continue  # recreated: try again
                    exc = outage
                if self.stopping.is_set():
                    raise
                delay = _backoff(attempt)
                attempt += 1
                log = logger.warning if attempt == 1 else logger.debug
                log(
                    "%s waits for broker %r (%s); retrying in %.1f s.",
                    what,
                    self.path,
                    describe(exc),
                    delay,
                )
                if await _wait_for(self.stopping.wait(), delay):
                    raise

    async def _recover(self, exc: Exception) -> Exception | None:
        """Recreate what the server lost, if `exc` says it lost the broker's state.

        None once recreated (try again); the outage met while recreating, to
        retry as one; otherwise `exc` is raised, as taskiq would.
        """
        try:
            recreated = await self.lost.recover(exc)
        except Exception as recovering:
            if is_connection_error(recovering):
                return recovering
            logger.debug("Could not recreate the broker's state: %s", recovering)
            raise exc from None
        if not recreated:
            raise exc
        return None

    async def _retry_fetch(self, exc: Exception, waited: float) -> bool:
        """Whether the worker is stopping; otherwise fetch again when this returns."""
        if "Timeout" in type(exc).__name__ and waited >= IDLE_WAIT_SECONDS:
            logger.debug("Broker %r: idle fetch timed out; fetching again.", self.path)
            self._recovered()
            return False
        return await self._wait_or_give_up(exc, starting=False)

    async def _wait_or_give_up(self, exc: Exception, starting: bool) -> bool:
        """Back off before the next attempt, or end the command past the timeout.

        Returns whether a signal asked the worker to stop meanwhile.
        """
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        waited = now - self.outage_since
        if waited >= self.retry_timeout:
            message = (
                f"Broker {self.path!r} unreachable for {waited:.0f} s "
                f"(--broker-retry-timeout {self.retry_timeout:g}): {describe(exc)}"
            )
            if starting:
                raise BrokerStartupError(message) from exc
            self.give_up(message)  # the command stops every process gracefully
            await self.stopping.wait()
            return True
        # The last attempt lands on the deadline rather than past it.
        delay = min(_backoff(self.attempts), self.retry_timeout - waited)
        self.attempts += 1
        logger.warning(
            "Broker %r unreachable (%s); retrying in %.1f s.",
            self.path,
            describe(exc),
            delay,
        )
        return await _wait_for(self.stopping.wait(), delay)

    def _recovered(self) -> None:
        if self.outage_since is not None:
            logger.warning(
                "Broker %r is back after %.1f s.",
                self.path,
                time.monotonic() - self.outage_since,
            )
        self.outage_since = None
        self.attempts = 0


def unrenewed_fetch(broker: AsyncBroker) -> str | None:
    """Why the broker could not ride out a server restart, when we can tell.

    taskiq-nats' pull-based JetStream broker fetches with no timeout by
    default; a NATS server that restarts forgets the pending fetch, and the
    worker waits for its answer for ever. Said before any worker starts.
    """
    if (
        type(broker).__name__ == "PullBasedJetStreamBroker"
        and getattr(broker, "pull_consume_timeout", 0) is None
    ):
        return (
            "PullBasedJetStreamBroker has no pull_consume_timeout: after a NATS "
            "server restart its workers would wait for ever on a fetch the "
            "server forgot. Pass pull_consume_timeout=5 (seconds)."
        )
    return None


async def _wait_for(waiting: Awaitable[Any], seconds: float) -> bool:
    """Whether `waiting` finished within `seconds`."""
    try:
        await asyncio.wait_for(waiting, seconds)
    except asyncio.TimeoutError:
        return False
    return True
